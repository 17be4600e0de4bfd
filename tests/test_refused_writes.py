"""A write refused with a client error leaves nothing behind, though it shares its group
commit with others (issue 32, item 3): each operation runs in its own SAVEPOINT. Before,
an operation that wrote and then refused (an arena vote whose preference row went in before
the vote was refused) was committed with its group. On SQLite and PostgreSQL alike."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from sqlalchemy import Connection, func, insert, select

from server.errors import Conflict
from server.store.database import migrate, open_engine
from server.store.schema import completions
from server.store.writer import GroupCommitWriter


def _row(completion_id: str) -> dict[str, Any]:
    return {
        "id": completion_id,
        "created_at": time.time(),
        "endpoint": "chat",
        "model": "m",
        "family": "chat",
        "template_fingerprint": "f",
        "request": {},
        "prompt_text": "p",
        "sampling": {},
        "choices": [],
        "prompt_tokens": 1,
        "completion_tokens": 0,
        "latency_ms": 1.0,
        "status": "finished",
        "key_id": "k",
    }


def test_item_3_a_refused_write_stores_nothing(store_url: str) -> None:
    engine = open_engine(store_url)
    migrate(engine)
    writer = GroupCommitWriter(engine)
    release = threading.Event()

    def hold(conn: Connection) -> None:  # keeps the writer busy while the next ones queue
        release.wait(10)

    def write_then_refuse(conn: Connection) -> None:
        conn.execute(insert(completions).values(**_row("refused")))
        raise Conflict("Battle `b` was already voted on.")

    def write(conn: Connection) -> str:
        conn.execute(insert(completions).values(**_row("kept")))
        return "kept"

    try:
        first = writer.submit(hold)
        refused, kept = writer.submit(write_then_refuse), writer.submit(write)
        release.set()  # the two queued writes now commit as one group
        first.result(10)
        with pytest.raises(Conflict):
            refused.result(10)
        assert kept.result(10) == "kept"
    finally:
        writer.close()
    with engine.connect() as conn:
        ids = set(conn.execute(select(completions.c.id)).scalars())
        assert ids == {"kept"}
        assert conn.execute(select(func.count()).select_from(completions)).scalar_one() == 1
    engine.dispose()
