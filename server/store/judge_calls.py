"""The SQL behind AI judges: a verdict stored with its feedback row in one transaction, the
judge calls listed, and the stored completions a judge has yet to see.

Owns: these statements, each run on a connection the ``Store`` hands in (a read connection
or the group-commit writer's transaction).
Does not know: HTTP, how judges are asked (``evaluation.judges``).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from sqlalchemy import Connection, exists, or_, select

from server.store.records import CompletionRecord, JudgeCallRow
from server.store.schema import completions, judge_calls
from server.store.storable import check_row


def insert_call(conn: Connection, row: JudgeCallRow) -> None:
    values = asdict(row)
    check_row(judge_calls, values)
    conn.execute(judge_calls.insert().values(**values))


def list_calls(
    conn: Connection,
    *,
    judge: str | None = None,
    completion_id: str | None = None,
    limit: int = 1000,
) -> list[JudgeCallRow]:
    conditions: list[Any] = []
    if judge is not None:
        conditions.append(judge_calls.c.judge == judge)
    if completion_id is not None:
        conditions.append(judge_calls.c.completion_id == completion_id)
    rows = conn.execute(
        select(judge_calls)
        .where(*conditions)
        .order_by(judge_calls.c.created_at, judge_calls.c.id)
        .limit(limit)
    ).all()
    return [JudgeCallRow.from_row(r) for r in rows]


def unjudged_completions(
    conn: Connection,
    *,
    judge: str,
    model: str | None,
    since: float | None,
    limit: int | None,
) -> list[CompletionRecord]:
    """Finished completions (oldest first) on which ``judge`` has no verdict yet: a rerun of
    ``aligngate judge`` continues where the last one stopped instead of judging twice."""
    seen = exists().where(
        judge_calls.c.completion_id == completions.c.id, judge_calls.c.judge == judge
    )
    conditions: list[Any] = [
        completions.c.status == "finished",
        ~seen,
        # A judge's own request (``user: judge:…``), stored by an endpoint anyway.
        or_(completions.c.user.is_(None), ~completions.c.user.startswith("judge:")),
    ]
    if model is not None:
        conditions.append(completions.c.model == model)
    if since is not None:
        conditions.append(completions.c.created_at >= since)
    query = (
        select(completions).where(*conditions).order_by(completions.c.created_at, completions.c.id)
    )
    if limit is not None:
        query = query.limit(limit)
    return [CompletionRecord.from_row(r) for r in conn.execute(query).all()]
