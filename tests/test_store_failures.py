"""A store that cannot write — full (SQLite at its page limit), read-only or refusing
connections (PostgreSQL) — answers feedback with 503 in the OpenAI error schema, never a 2xx,
and stores nothing. The feedback route runs in-process over ASGI on the real store."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import create_engine, event, text

from server.errors import install_error_handlers
from server.guards.ratelimit import RateLimiter
from server.metrics import GatewayMetrics
from server.routes import feedback
from server.store import Store
from tests.test_store import completion


def feedback_app(store: Store) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(feedback.router)
    app.state.store = store
    app.state.metrics = GatewayMetrics()
    app.state.feedback_limiter = RateLimiter(0, "feedback requests")
    return app


async def post_feedback(store: Store, body: dict[str, Any]) -> httpx.Response:
    transport = httpx.ASGITransport(app=feedback_app(store))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as client:
        return await client.post("/v1/feedback", json=body)


async def assert_refused(store: Store) -> None:
    r = await post_feedback(store, {"completion_id": "c1", "judgment": "x" * 6000})
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["code"] == "store_unavailable" and error["type"] == "server_error"
    assert "nothing was stored" in error["message"]


async def test_full_sqlite_answers_503(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        store.record_completion(completion("c1")).result(timeout=10)
        ok = await post_feedback(store, {"completion_id": "c1", "rating": 1})
        assert ok.status_code == 201

        # From now on every connection may not grow the file: SQLite's "database or disk
        # is full", the error a full disk gives.
        @event.listens_for(store.engine, "connect")
        def _cap(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            pages = dbapi_conn.execute("PRAGMA page_count").fetchone()[0]
            dbapi_conn.execute(f"PRAGMA max_page_count = {pages}")

        store.engine.dispose()
        for _ in range(3):  # fill the free space of the last pages, then refuse
            r = await post_feedback(store, {"completion_id": "c1", "judgment": "x" * 6000})
            if r.status_code == 503:
                break
        before, _ = await store.list_feedback()
        await assert_refused(store)
        after, _ = await store.list_feedback()
        assert len(after) == len(before)  # the refused judgment is not there
    finally:
        store.close()


def _admin(postgres_admin_url: str) -> Callable[[str], None]:
    engine = create_engine(f"{postgres_admin_url}/postgres", isolation_level="AUTOCOMMIT")

    def run(sql: str) -> None:
        with engine.connect() as conn:
            conn.execute(text(sql))

    return run


@pytest.mark.parametrize(
    "breakage",
    [
        'ALTER DATABASE "{db}" SET default_transaction_read_only = on',  # read-only
        'ALTER DATABASE "{db}" WITH ALLOW_CONNECTIONS false',  # unavailable
    ],
    ids=["read-only", "refusing-connections"],
)
async def test_broken_postgresql_answers_503(postgres_admin_url: str, breakage: str) -> None:
    from tests.postgres import create_database

    url = create_database(postgres_admin_url)
    db = url.rsplit("/", 1)[1]
    admin = _admin(postgres_admin_url)
    store = Store.open(url)
    try:
        store.record_completion(completion("c1")).result(timeout=10)
        admin(breakage.format(db=db))
        admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}'")
        await assert_refused(store)
        # Repaired, the same store writes again (the writer survived the failures).
        admin(f'ALTER DATABASE "{db}" RESET default_transaction_read_only')
        admin(f'ALTER DATABASE "{db}" WITH ALLOW_CONNECTIONS true')
        admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}'")
        ok = await post_feedback(store, {"completion_id": "c1", "rating": 1})
        assert ok.status_code == 201, ok.text
        rows, _ = await store.list_feedback()
        assert [r.rating for r in rows] == [1]
    finally:
        store.close()
