"""Locks that several front ends on one database share: an online iteration holds its base
model's lock from planning (which picks the iteration and the feedback window) until the
window's watermark is recorded, so two front ends never train the same window.

PostgreSQL: a session advisory lock (``pg_try_advisory_lock``) on a connection of its own,
kept for the whole iteration (minutes) and closed on release. Should the front end die,
PostgreSQL ends its session and the lock goes with it: nothing to clean up.
SQLite: one front end per database file (the store's rule), whose job list already allows
one iteration at a time; the lock is taken in this process only.

Owns: the lock keys and the SQL. Does not know: training, HTTP.
"""

from __future__ import annotations

import hashlib
import threading

from sqlalchemy import Connection, Engine, text

_local = threading.Lock()
_held_here: set[tuple[str, str]] = set()


def lock_key(name: str) -> int:
    """A signed 64-bit key for ``name`` (advisory locks are keyed by one bigint)."""
    digest = hashlib.sha256(f"aligngate:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class HeldLock:
    """A lock this process holds until ``release`` (idempotent)."""

    def __init__(self, name: str, conn: Connection | None, local: tuple[str, str]) -> None:
        self.name = name
        self._conn = conn
        self._local = local

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": lock_key(self.name)})
                conn.commit()
            except Exception:
                conn.invalidate()  # end the session: PostgreSQL drops its locks
            finally:
                conn.close()
        with _local:
            _held_here.discard(self._local)


def try_lock(engine: Engine, name: str) -> HeldLock | None:
    """``name``'s lock, or None when another front end (or this one) holds it."""
    local = (str(engine.url), name)
    with _local:
        if local in _held_here:
            return None
        _held_here.add(local)
    if engine.dialect.name != "postgresql":
        return HeldLock(name, None, local)
    conn = engine.connect()
    try:
        got = conn.execute(
            text("SELECT pg_try_advisory_lock(:k)"), {"k": lock_key(name)}
        ).scalar_one()
        conn.commit()  # the lock is the session's, not the transaction's
    except BaseException:
        conn.close()
        with _local:
            _held_here.discard(local)
        raise
    if not got:
        conn.close()
        with _local:
            _held_here.discard(local)
        return None
    return HeldLock(name, conn, local)
