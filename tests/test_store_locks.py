"""The iteration lock that front ends sharing one database take: refused while held, free
again after release, and (PostgreSQL) gone with a front end whose session ended."""

from __future__ import annotations

from sqlalchemy import create_engine, text

from server.store import Store
from server.store.locks import lock_key


def _other_front_end_gets(url: str, name: str) -> bool:
    """Whether another process's session could take ``name``'s advisory lock now."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": lock_key(name)})
            if got.scalar_one():
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": lock_key(name)})
                return True
            return False
    finally:
        engine.dispose()


def test_one_holder_at_a_time_per_name(store_url: str) -> None:
    store = Store.open(store_url)
    try:
        held = store.try_lock("align:m")
        assert held is not None
        assert store.try_lock("align:m") is None
        other = store.try_lock("align:other-model")  # another base trains meanwhile
        assert other is not None
        if store_url.startswith("postgresql"):
            assert not _other_front_end_gets(store_url, "align:m")
        held.release()
        held.release()  # idempotent
        if store_url.startswith("postgresql"):
            assert _other_front_end_gets(store_url, "align:m")
        again = store.try_lock("align:m")
        assert again is not None
        again.release()
        other.release()
    finally:
        store.close()


def test_a_dead_sessions_lock_is_free(store_url: str) -> None:
    if not store_url.startswith("postgresql"):
        return  # SQLite: one process, whose lock dies with it
    store = Store.open(store_url)
    try:
        held = store.try_lock("align:m")
        assert held is not None
        held._conn.invalidate()  # type: ignore[union-attr]  # the front end's session ends
        assert _other_front_end_gets(store_url, "align:m")
    finally:
        store.close()
