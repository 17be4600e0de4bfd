"""The SQL behind OpenAI's Stored Completions API: chat records listed by cursor, their
metadata read, replaced and filtered on, and a record deleted.

Owns: these statements, each run on a connection the ``Store`` hands in (a read connection
or the group-commit writer's transaction).
Does not know: HTTP, the OpenAI response shapes (``serving.stored`` builds those).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, and_, delete, func, or_, select

from server.errors import Conflict, NotFound
from server.store.battles import not_an_open_battle_answer
from server.store.records import CompletionRecord
from server.store.schema import (
    battles,
    completion_metadata,
    completions,
    feedback,
    judge_calls,
)
from server.store.storable import check_row

CHAT = "chat"


def _mine(owner: str | None) -> list[Any]:
    """Chat records of ``owner`` (a key id), less its open battles' answers (blind until
    the vote); None (the admin): everyone's."""
    conditions = [completions.c.endpoint == CHAT]
    if owner is not None:
        conditions += [completions.c.key_id == owner, *not_an_open_battle_answer()]
    return conditions


def _missing(completion_id: str, param: str = "completion_id") -> NotFound:
    # The same words for a missing record and another key's: existence is not revealed.
    return NotFound(f"No stored chat completion `{completion_id}`.", param=param)


def insert_metadata(conn: Connection, completion_id: str, pairs: Mapping[str, str]) -> None:
    rows = [{"completion_id": completion_id, "key": k, "value": v} for k, v in pairs.items()]
    for row in rows:
        check_row(completion_metadata, row)
    if rows:
        conn.execute(completion_metadata.insert(), rows)


def metadata_of(conn: Connection, ids: Sequence[str]) -> dict[str, dict[str, str]]:
    """Each completion's metadata ({} when it has none)."""
    found: dict[str, dict[str, str]] = {i: {} for i in ids}
    for start in range(0, len(ids), 500):
        rows = conn.execute(
            select(completion_metadata)
            .where(completion_metadata.c.completion_id.in_(list(ids[start : start + 500])))
            .order_by(completion_metadata.c.key)
        )
        for r in rows:
            found[r.completion_id][r.key] = r.value
    return found


def _with_metadata(conn: Connection, rows: Sequence[Any]) -> list[CompletionRecord]:
    records = [CompletionRecord.from_row(r) for r in rows]
    pairs = metadata_of(conn, [r.id for r in records])
    for record in records:
        record.metadata = pairs[record.id]
    return records


def get_chat(conn: Connection, completion_id: str, owner: str | None) -> CompletionRecord:
    row = conn.execute(
        select(completions).where(completions.c.id == completion_id, *_mine(owner))
    ).first()
    if row is None:
        raise _missing(completion_id)
    return _with_metadata(conn, [row])[0]


def list_chat(
    conn: Connection,
    *,
    owner: str | None,
    model: str | None,
    metadata: Mapping[str, str],
    after: str | None,
    limit: int,
    newest_first: bool,
) -> tuple[list[CompletionRecord], bool]:
    """A page of chat records ordered by (created_at, id), and whether more follow.
    ``after``: the id of the previous page's last record (one this caller can see)."""
    conditions = _mine(owner)
    if model is not None:
        conditions.append(completions.c.model == model)
    for key, value in metadata.items():
        conditions.append(
            completions.c.id.in_(
                select(completion_metadata.c.completion_id).where(
                    completion_metadata.c.key == key, completion_metadata.c.value == value
                )
            )
        )
    if after is not None:
        anchor = conn.execute(
            select(completions.c.created_at).where(completions.c.id == after, *_mine(owner))
        ).first()
        if anchor is None:
            raise _missing(after, param="after")
        at = anchor.created_at
        if newest_first:
            conditions.append(
                or_(
                    completions.c.created_at < at,
                    and_(completions.c.created_at == at, completions.c.id < after),
                )
            )
        else:
            conditions.append(
                or_(
                    completions.c.created_at > at,
                    and_(completions.c.created_at == at, completions.c.id > after),
                )
            )
    order = (
        (completions.c.created_at.desc(), completions.c.id.desc())
        if newest_first
        else (completions.c.created_at, completions.c.id)
    )
    rows = conn.execute(
        select(completions).where(*conditions).order_by(*order).limit(limit + 1)
    ).all()
    return _with_metadata(conn, rows[:limit]), len(rows) > limit


def replace_metadata(
    conn: Connection, completion_id: str, pairs: Mapping[str, str], owner: str | None
) -> CompletionRecord:
    """Replace the record's metadata with ``pairs`` (all of it: a key left out is gone)."""
    get_chat(conn, completion_id, owner)  # NotFound unless the caller may see it
    conn.execute(
        delete(completion_metadata).where(completion_metadata.c.completion_id == completion_id)
    )
    insert_metadata(conn, completion_id, pairs)
    return get_chat(conn, completion_id, owner)


def delete_chat(conn: Connection, completion_id: str, owner: str | None) -> dict[str, int]:
    """Delete the record, its metadata and what derives from it: the feedback on it or
    naming it as a preference's rejected side that no one reviewed yet (people's pending
    judgments, AI judges' verdicts) and every AI judge's call about it (its replies, ties
    included). Returns how many feedback rows and judge calls went with it.

    Refused with Conflict, nothing deleted, while the record is held: by reviewed feedback
    (accepted training data — adapters trained on it name its hash) or as an arena
    battle's answer (the leaderboard's evidence)."""
    get_chat(conn, completion_id, owner)
    names_it = or_(
        feedback.c.completion_id == completion_id, feedback.c.preferred_over == completion_id
    )
    reviewed = conn.execute(
        select(func.count()).select_from(feedback).where(names_it, feedback.c.reviewed)
    ).scalar_one()
    if reviewed:
        raise Conflict(
            f"Stored chat completion `{completion_id}` has {reviewed} reviewed feedback "
            "record(s): reviewed feedback is training data, and its completions are not "
            "deleted (unreviewed feedback and AI judges' verdicts are deleted with them).",
            param="completion_id",
        )
    battled = conn.execute(
        select(func.count())
        .select_from(battles)
        .where(
            or_(battles.c.completion_a == completion_id, battles.c.completion_b == completion_id)
        )
    ).scalar_one()
    if battled:
        raise Conflict(
            f"Stored chat completion `{completion_id}` is an answer in an arena battle: "
            "battles are evaluation data and their answers are not deleted.",
            param="completion_id",
        )
    pending = list(conn.execute(select(feedback.c.id).where(names_it)).scalars())
    about_it = or_(
        judge_calls.c.completion_id == completion_id, judge_calls.c.feedback_id.in_(pending)
    )
    calls = conn.execute(delete(judge_calls).where(about_it)).rowcount
    if pending:
        conn.execute(delete(feedback).where(feedback.c.id.in_(pending)))
    conn.execute(
        delete(completion_metadata).where(completion_metadata.c.completion_id == completion_id)
    )
    conn.execute(delete(completions).where(completions.c.id == completion_id))
    return {"feedback": len(pending), "judge_calls": calls}
