"""The store's operations: completion records, feedback, listings and export reads.

Owns: every SQL statement of the project. Writes go through the group-commit writer;
reads run on their own connections in worker threads.
Does not know: engines, templates, HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import asdict
from typing import Any

from sqlalchemy import Connection, Engine, and_, func, or_, select, update

from server.errors import (
    Conflict,
    IdempotencyConflict,
    InvalidRequest,
    NotFound,
    StoreUnavailable,
)
from server.store import battles
from server.store import chat_completions as chat
from server.store import judge_calls as judges
from server.store.battles import BattleCreate, BattleRow
from server.store.database import migrate, open_engine
from server.store.holdout import held_out
from server.store.locks import HeldLock, try_lock
from server.store.records import (
    CompletionRecord,
    FeedbackCreate,
    FeedbackRow,
    JudgeCallRow,
    polarity_of,
)
from server.store.schema import FEEDBACK_SEQUENCE, completions, counters, feedback
from server.store.storable import check_fields, check_row
from server.store.writer import GroupCommitWriter

log = logging.getLogger(__name__)

VERDICTS = {True: "desirable", False: "undesirable", None: "neutral"}


def _payload_hash(fb: FeedbackCreate) -> str:
    # surrogatepass: text the store refuses (``storable``) must reach that refusal.
    blob = json.dumps(fb.payload(), sort_keys=True, ensure_ascii=False).encode(
        "utf-8", "surrogatepass"
    )
    return hashlib.sha256(blob).hexdigest()


def encode_cursor(created_at: float, row_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created_at, row_id]).encode()).decode()


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        created_at, row_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return float(created_at), str(row_id)
    except (ValueError, TypeError) as exc:
        raise InvalidRequest("invalid cursor", param="after") from exc


class Store:
    def __init__(
        self,
        engine: Engine,
        *,
        on_commit: Callable[[float, int], None] | None = None,
        on_error: Callable[[], None] | None = None,
    ):
        self.engine = engine
        self._on_error = on_error or (lambda: None)
        self._writer = GroupCommitWriter(engine, on_commit=on_commit, on_error=on_error)
        # Records queued but not yet committed, by id: a read of one waits for its commit,
        # so a client that retrieves the completion it was just answered finds it.
        self._queued: dict[str, Future[None]] = {}

    @classmethod
    def open(cls, url: str, **callbacks: Any) -> Store:
        engine = open_engine(url)
        migrate(engine)
        return cls(engine, **callbacks)

    def close(self) -> None:
        self._writer.close()
        self.engine.dispose()

    # ---- completions --------------------------------------------------------------------

    def record_completion(self, record: CompletionRecord) -> Future[None]:
        """Queue a completion record; never raises (a failure is logged and counted)."""
        values = record.row()

        def write(conn: Connection) -> None:
            check_row(completions, values)
            conn.execute(completions.insert().values(**values))
            chat.insert_metadata(conn, record.id, record.metadata or {})

        future = self._writer.submit(write)
        self._queued[record.id] = future

        def report(done: Future[None]) -> None:
            self._queued.pop(record.id, None)
            if done.exception() is not None:
                log.error("Could not store completion %s: %s", record.id, done.exception())
                self._on_error()

        future.add_done_callback(report)
        return future

    async def _committed(self, completion_id: str | None = None) -> None:
        """Wait until the record ``completion_id`` (None: every record queued now) is
        committed or has failed. Writes need not wait: the writer runs them in order."""
        if completion_id is not None:
            one = self._queued.get(completion_id)
            waiting = [one] if one is not None else []
        else:
            waiting = list(self._queued.values())
        if waiting:
            await asyncio.wait([asyncio.wrap_future(f) for f in waiting])

    async def get_completion(
        self, completion_id: str, *, owner: str | None = None
    ) -> tuple[CompletionRecord, list[FeedbackRow]]:
        """The record and its feedback. ``owner``: only if that key created it (another key's
        record reads as missing, so its existence is not revealed); None: any."""

        def read() -> tuple[CompletionRecord, list[FeedbackRow]] | None:
            with self.engine.connect() as conn:
                row = conn.execute(
                    select(completions).where(completions.c.id == completion_id, *_visible(owner))
                ).first()
                if row is None:
                    return None
                rows = conn.execute(
                    select(feedback)
                    .where(feedback.c.completion_id == completion_id)
                    .order_by(feedback.c.created_at, feedback.c.id)
                ).all()
                record = CompletionRecord.from_row(row)
                record.metadata = chat.metadata_of(conn, [record.id])[record.id]
                return record, [FeedbackRow.from_row(r) for r in rows]

        await self._committed(completion_id)
        result = await self._read(read)
        if result is None:
            raise NotFound(f"No stored completion `{completion_id}`.", param="completion_id")
        return result

    # ---- OpenAI's Stored Completions: chat records only (SQL in ``chat_completions``) ------

    async def get_chat_completion(
        self, completion_id: str, *, owner: str | None = None
    ) -> CompletionRecord:
        """A chat record with its metadata; another key's reads as missing."""

        def read() -> CompletionRecord:
            with self.engine.connect() as conn:
                return chat.get_chat(conn, completion_id, owner)

        await self._committed(completion_id)
        return await self._read(read)

    async def list_chat_completions(
        self,
        *,
        owner: str | None = None,
        model: str | None = None,
        metadata: dict[str, str] | None = None,
        after: str | None = None,
        limit: int = 20,
        newest_first: bool = False,
    ) -> tuple[list[CompletionRecord], bool]:
        """A page of chat records (oldest first, or newest first) and whether more follow;
        ``after``: the last id of the previous page; ``metadata``: every pair must match."""

        def read() -> tuple[list[CompletionRecord], bool]:
            with self.engine.connect() as conn:
                return chat.list_chat(
                    conn,
                    owner=owner,
                    model=model,
                    metadata=metadata or {},
                    after=after,
                    limit=limit,
                    newest_first=newest_first,
                )

        await self._committed()
        return await self._read(read)

    async def update_chat_metadata(
        self, completion_id: str, metadata: dict[str, str] | None, *, owner: str | None = None
    ) -> CompletionRecord:
        """Replace a chat record's metadata (None: remove it); returns the record."""
        return await self._write(
            lambda conn: chat.replace_metadata(conn, completion_id, metadata or {}, owner)
        )

    async def delete_chat_completion(
        self, completion_id: str, *, owner: str | None = None
    ) -> dict[str, int]:
        """Delete a chat record and what derives from it; Conflict while reviewed feedback
        or a battle holds it (see ``chat.delete_chat``). Returns the derived rows deleted."""
        return await self._write(lambda conn: chat.delete_chat(conn, completion_id, owner))

    # ---- feedback -----------------------------------------------------------------------

    async def add_feedback(
        self, fb: FeedbackCreate, *, owner: str | None = None
    ) -> tuple[FeedbackRow, bool]:
        """Store feedback durably; returns (row, created). A replay of the same idempotency
        key with the same payload returns the stored row with created=False. ``owner``: the
        completions judged must be that key's (another key's read as missing)."""
        digest = _payload_hash(fb)

        def write(conn: Connection) -> tuple[FeedbackRow, bool]:
            return insert_feedback(conn, fb, owner, digest)

        future = self._writer.submit(write)
        try:
            return await asyncio.wrap_future(future)
        except (IdempotencyConflict, NotFound, InvalidRequest):
            raise
        except Exception as exc:
            raise StoreUnavailable(
                "The feedback store is unavailable; nothing was stored."
            ) from exc

    async def list_feedback(
        self,
        *,
        model: str | None = None,
        label: str | None = None,
        since: float | None = None,
        after: str | None = None,
        limit: int = 100,
        newest_first: bool = False,
        owner: str | None = None,
    ) -> tuple[list[FeedbackRow], str | None]:
        """Oldest first (or newest first); ``after`` is the cursor the previous page returned.
        ``owner``: only feedback that key posted; None: all."""
        conditions = list(_owned(feedback, owner))
        if model is not None:
            conditions.append(feedback.c.model == model)
        if label is not None:
            conditions.append(feedback.c.label == label)
        if since is not None:
            conditions.append(feedback.c.created_at >= since)
        if after is not None:
            at, row_id = decode_cursor(after)
            if newest_first:
                beyond = or_(
                    feedback.c.created_at < at,
                    and_(feedback.c.created_at == at, feedback.c.id < row_id),
                )
            else:
                beyond = or_(
                    feedback.c.created_at > at,
                    and_(feedback.c.created_at == at, feedback.c.id > row_id),
                )
            conditions.append(beyond)
        order = (
            (feedback.c.created_at.desc(), feedback.c.id.desc())
            if newest_first
            else (feedback.c.created_at, feedback.c.id)
        )
        query = select(feedback).where(*conditions).order_by(*order).limit(limit + 1)

        def read() -> list[FeedbackRow]:
            with self.engine.connect() as conn:
                return [FeedbackRow.from_row(r) for r in conn.execute(query).all()]

        rows = await self._read(read)
        if len(rows) > limit:
            rows = rows[:limit]
            return rows, encode_cursor(rows[-1].created_at, rows[-1].id)
        return rows, None

    async def set_reviewed(self, feedback_ids: Sequence[str], reviewed: bool) -> int:
        """Mark feedback as reviewed (or not); all ids must exist, else nothing changes."""
        ids = sorted(set(feedback_ids))

        def write(conn: Connection) -> int:
            check_fields(ids=ids)
            found = {
                r.id for r in conn.execute(select(feedback.c.id).where(feedback.c.id.in_(ids)))
            }
            missing = [i for i in ids if i not in found]
            if missing:
                raise NotFound(f"No feedback `{missing[0]}`.", param="ids")
            conn.execute(update(feedback).where(feedback.c.id.in_(ids)).values(reviewed=reviewed))
            return len(ids)

        try:
            return await asyncio.wrap_future(self._writer.submit(write))
        except (NotFound, InvalidRequest):
            raise
        except Exception as exc:
            raise StoreUnavailable("The feedback store is unavailable; nothing changed.") from exc

    async def feedback_summary(self, *, owner: str | None = None) -> list[dict[str, Any]]:
        """Per model: how much feedback, of which polarity, with words, as preferences
        (``owner``: only that key's)."""
        judged = feedback.c.judgment.is_not(None)
        preferred = feedback.c.preferred_over.is_not(None)
        group = (
            feedback.c.model,
            feedback.c.label,
            feedback.c.rating,
            feedback.c.rating_scale,
            judged,
            preferred,
        )
        query = select(*group, func.count()).where(*_owned(feedback, owner)).group_by(*group)

        def read() -> list[Any]:
            with self.engine.connect() as conn:
                return list(conn.execute(query).all())

        totals: dict[str, dict[str, Any]] = {}
        for model, label, rating, scale, has_judgment, has_preference, count in await self._read(
            read
        ):
            entry = totals.setdefault(
                model,
                {
                    "model": model,
                    "total": 0,
                    "desirable": 0,
                    "undesirable": 0,
                    "neutral": 0,
                    "judgments": 0,
                    "preferences": 0,
                },
            )
            entry["total"] += count
            polarity = polarity_of(rating, scale, label, bool(has_judgment))
            entry[VERDICTS[polarity]] += count
            entry["judgments"] += count if has_judgment else 0
            entry["preferences"] += count if has_preference else 0
        return sorted(totals.values(), key=lambda e: e["model"])

    # ---- AI judges -----------------------------------------------------------------------

    async def add_judge_call(
        self, call: JudgeCallRow, fb: FeedbackCreate | None = None
    ) -> tuple[JudgeCallRow, FeedbackRow | None]:
        """Store a judge's verdict: the feedback it becomes (None: a pairwise tie, which is
        no preference) and its ``judge_calls`` row, committed together or not at all."""
        digest = _payload_hash(fb) if fb is not None else ""

        def write(conn: Connection) -> tuple[JudgeCallRow, FeedbackRow | None]:
            row = None
            if fb is not None:
                row, _ = insert_feedback(conn, fb, None, digest)
                call.feedback_id = row.id
            judges.insert_call(conn, call)
            return call, row

        try:
            return await asyncio.wrap_future(self._writer.submit(write))
        except (IdempotencyConflict, NotFound, InvalidRequest):
            raise
        except Exception as exc:
            raise StoreUnavailable("The store is unavailable; the verdict was not stored.") from exc

    async def list_judge_calls(
        self, *, judge: str | None = None, completion_id: str | None = None, limit: int = 1000
    ) -> list[JudgeCallRow]:
        def read() -> list[JudgeCallRow]:
            with self.engine.connect() as conn:
                return judges.list_calls(
                    conn, judge=judge, completion_id=completion_id, limit=limit
                )

        return list(await self._read(read))

    async def unjudged_completions(
        self,
        *,
        judge: str,
        model: str | None = None,
        since: float | None = None,
        limit: int | None = None,
    ) -> list[CompletionRecord]:
        """Finished completions, oldest first, that ``judge`` has not judged yet."""

        def read() -> list[CompletionRecord]:
            with self.engine.connect() as conn:
                return judges.unjudged_completions(
                    conn, judge=judge, model=model, since=since, limit=limit
                )

        return list(await self._read(read))

    async def held_out_completions(
        self, *, models: list[str], share: float, limit: int, scan: int = 100_000
    ) -> list[CompletionRecord]:
        """The newest conversations (chat, responses) of ``models`` in the held-out
        ``share`` of traffic (``holdout``), at most ``limit``, among the newest ``scan``."""

        def read() -> list[CompletionRecord]:
            with self.engine.connect() as conn:
                ids = conn.execute(
                    select(completions.c.id)
                    .where(
                        completions.c.model.in_(models),
                        completions.c.endpoint.in_(("chat", "responses")),
                    )
                    .order_by(completions.c.created_at.desc(), completions.c.id.desc())
                    .limit(scan)
                ).scalars()
                chosen = [i for i in ids if held_out(i, share)][:limit]
                if not chosen:
                    return []
                rows = conn.execute(select(completions).where(completions.c.id.in_(chosen)))
                by_id = {row.id: CompletionRecord.from_row(row) for row in rows}
                return [by_id[i] for i in chosen if i in by_id]

        return list(await self._read(read))

    # ---- arena battles (SQL in ``battles``) ---------------------------------------------------

    async def record_battle(self, new: BattleCreate) -> BattleRow:
        """Store a battle: an arena's, open until its vote, or a judge's, decided already."""
        return await self._write(lambda conn: battles.insert_battle(conn, new))

    async def get_battle(self, battle_id: str, *, owner: str | None = None) -> BattleRow:
        """The battle and its answers' texts (``owner``: only that key's; None: any)."""
        return await self._read(lambda: self._with(battles.select_battle, battle_id, owner))

    async def vote_battle(
        self,
        battle_id: str,
        winner: str,
        *,
        key_id: str,
        annotator: str | None = None,
        owner: str | None = None,
    ) -> tuple[BattleRow, FeedbackRow | None]:
        """The battle's one vote (a second: Conflict) and, for a decisive vote whose answers
        share their prompt text, the preference feedback it became — in one transaction."""
        return await self._write(
            lambda conn: battles.vote(
                conn,
                battle_id,
                winner,
                owner=owner,
                key_id=key_id,
                annotator=annotator,
                insert_feedback=insert_feedback,
            )
        )

    async def battle_outcomes(
        self, *, source: str | None = None, owner: str | None = None
    ) -> tuple[list[tuple[str, str, str]], list[str]]:
        """Decided battles as (model_a, model_b, winner), oldest first (``source``: only
        its; ``owner``: only that key's), and every source that decided one."""

        def read() -> tuple[list[tuple[str, str, str]], list[str]]:
            with self.engine.connect() as conn:
                outcomes = battles.select_outcomes(conn, source=source, owner=owner)
                return outcomes, battles.select_sources(conn, owner=owner)

        return await self._read(read)

    # ---- export reads (synchronous: the CLI and background jobs use them) -------------------

    def export_rows(
        self,
        *,
        model: str | None = None,
        since: float | None = None,
        until: float | None = None,
        annotators: Sequence[str] | None = None,
        key_ids: Sequence[str] | None = None,
        trusted: Sequence[str] | None = None,
        after_seq: int | None = None,
        through_seq: int | None = None,
    ) -> tuple[list[FeedbackRow], dict[str, CompletionRecord]]:
        """Feedback (in commit order; ``since`` ≤ created < ``until``; ``after_seq`` < seq ≤
        ``through_seq``) and every completion it names, for exports. ``annotators`` /
        ``key_ids``: only theirs. ``trusted``: only reviewed feedback or feedback posted with
        these key ids (``[]``: reviewed only) — trust comes from the key, never from the
        ``annotator`` label a body carries. Iterations select by sequence: a window
        ``(previous watermark, feedback_watermark()]`` misses no row and repeats none."""
        conditions = []
        if after_seq is not None:
            conditions.append(feedback.c.seq > after_seq)
        if through_seq is not None:
            conditions.append(feedback.c.seq <= through_seq)
        if model is not None:
            conditions.append(feedback.c.model == model)
        if since is not None:
            conditions.append(feedback.c.created_at >= since)
        if until is not None:
            conditions.append(feedback.c.created_at < until)
        if annotators is not None:
            conditions.append(feedback.c.annotator.in_(list(annotators)))
        if key_ids is not None:
            conditions.append(feedback.c.key_id.in_(list(key_ids)))
        if trusted is not None:
            conditions.append(
                or_(feedback.c.reviewed.is_(True), feedback.c.key_id.in_(list(trusted)))
            )
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(feedback).where(*conditions).order_by(feedback.c.seq, feedback.c.id)
            ).all()
            fbs = [FeedbackRow.from_row(r) for r in rows]
            ids = sorted(
                {f.completion_id for f in fbs} | {f.preferred_over for f in fbs if f.preferred_over}
            )
            records: dict[str, CompletionRecord] = {}
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                for r in conn.execute(select(completions).where(completions.c.id.in_(chunk))):
                    records[r.id] = CompletionRecord.from_row(r)
        return fbs, records

    def feedback_watermark(self) -> int:
        """The highest committed feedback sequence number: every row at or below it is
        committed and visible, and every later commit gets a higher number."""
        with self.engine.connect() as conn:
            value = conn.execute(
                select(counters.c.value).where(counters.c.name == FEEDBACK_SEQUENCE)
            ).scalar_one()
        return int(value)

    def try_lock(self, name: str) -> HeldLock | None:
        """``name``'s lock across every front end of this database, or None if held."""
        return try_lock(self.engine, name)

    def _with(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self.engine.connect() as conn:
            return fn(conn, *args)

    async def _read(self, fn: Callable[[], Any]) -> Any:
        try:
            return await asyncio.to_thread(fn)
        except NotFound:
            raise
        except Exception as exc:
            log.exception("Store read failed")
            self._on_error()
            raise StoreUnavailable("The store is unavailable.") from exc

    async def _write(self, fn: Callable[[Connection], Any]) -> Any:
        """Run ``fn`` in the writer's next transaction; a client's error passes through,
        anything else reads as the store being unavailable (nothing changed)."""
        try:
            return await asyncio.wrap_future(self._writer.submit(fn))
        except (NotFound, Conflict, InvalidRequest):
            raise
        except Exception as exc:
            raise StoreUnavailable("The store is unavailable; nothing changed.") from exc


def insert_feedback(
    conn: Connection, fb: FeedbackCreate, owner: str | None, digest: str | None = None
) -> tuple[FeedbackRow, bool]:
    """``add_feedback``'s checks and insert, inside the caller's transaction (an arena vote
    stores its preference in the same transaction as the vote)."""
    check_fields(**asdict(fb))  # before any statement names its text
    digest = digest or _payload_hash(fb)
    if fb.idempotency_key is not None:
        existing = conn.execute(
            select(feedback).where(
                feedback.c.key_id == fb.key_id,
                feedback.c.idempotency_key == fb.idempotency_key,
            )
        ).first()
        if existing is not None:
            row = FeedbackRow.from_row(existing)
            if row.payload_hash != digest:
                raise IdempotencyConflict(
                    "This idempotency_key was already used with a different payload.",
                    param="idempotency_key",
                )
            return row, False
    target = _judged_record(conn, fb.completion_id, owner, "completion_id")
    if fb.choice_index >= len(target.choices):
        raise InvalidRequest(
            f"choice_index {fb.choice_index} is out of range: completion "
            f"`{fb.completion_id}` has {len(target.choices)} choice(s).",
            param="choice_index",
        )
    if fb.preferred_over_choice is not None and fb.preferred_over is None:
        raise InvalidRequest(
            "preferred_over_choice needs preferred_over.", param="preferred_over_choice"
        )
    if fb.preferred_over is not None:
        other = _judged_record(conn, fb.preferred_over, owner, "preferred_over")
        losing = fb.preferred_over_choice or 0
        if losing >= len(other.choices):
            raise InvalidRequest(
                f"preferred_over_choice {losing} is out of range: completion "
                f"`{fb.preferred_over}` has {len(other.choices)} choice(s).",
                param="preferred_over_choice",
            )
        if fb.preferred_over == fb.completion_id and losing == fb.choice_index:
            raise InvalidRequest(
                "A choice cannot be preferred over itself.", param="preferred_over"
            )
        # Another model is fine (a side-by-side of two models is a DPO pair); the
        # prompt, as rendered, must be the same — per choice, since one completions
        # request may carry several prompts.
        if other.prompt_of(losing) != target.prompt_of(fb.choice_index):
            raise InvalidRequest(
                "preferred_over must name a completion (and choice) of the same prompt.",
                param="preferred_over",
            )
    row = FeedbackRow(
        id=f"fb-{uuid.uuid4().hex}",
        created_at=time.time(),
        completion_id=fb.completion_id,
        choice_index=fb.choice_index,
        model=target.model,
        judgment=fb.judgment,
        rating=fb.rating,
        rating_scale=fb.rating_scale,
        label=fb.label,
        preferred_over=fb.preferred_over,
        preferred_over_choice=fb.preferred_over_choice,
        annotator=fb.annotator,
        key_id=fb.key_id,
        idempotency_key=fb.idempotency_key,
        payload_hash=digest,
        seq=_next_seq(conn, FEEDBACK_SEQUENCE),
        explicit_reward=fb.reward,
        request_id=fb.request_id,
    )
    conn.execute(feedback.insert().values(**_feedback_values(row)))
    return row, True


def _feedback_values(row: FeedbackRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "created_at": row.created_at,
        "completion_id": row.completion_id,
        "choice_index": row.choice_index,
        "model": row.model,
        "judgment": row.judgment,
        "rating": row.rating,
        "rating_scale": row.rating_scale,
        "label": row.label,
        "preferred_over": row.preferred_over,
        "annotator": row.annotator,
        "key_id": row.key_id,
        "idempotency_key": row.idempotency_key,
        "payload_hash": row.payload_hash,
        "reviewed": row.reviewed,
        "preferred_over_choice": row.preferred_over_choice,
        "seq": row.seq,
        "reward": row.explicit_reward,
        "request_id": row.request_id,
    }


def _judged_record(conn: Connection, completion_id: str, owner: str | None, param: str) -> Any:
    row = conn.execute(
        select(completions).where(completions.c.id == completion_id, *_visible(owner))
    ).first()
    if row is None:
        raise NotFound(f"No stored completion `{completion_id}`.", param=param)
    return CompletionRecord.from_row(row)


def _next_seq(conn: Connection, name: str) -> int:
    """The next number of sequence ``name``, in this transaction. The UPDATE locks the
    counter's row until commit, so numbers commit in order (see ``schema.counters``)."""
    conn.execute(update(counters).where(counters.c.name == name).values(value=counters.c.value + 1))
    return int(conn.execute(select(counters.c.value).where(counters.c.name == name)).scalar_one())


def _visible(owner: str | None) -> list[Any]:
    """The completions ``owner`` may see: its own, less its open battles' answers (blind
    until the vote); None (the admin): all."""
    if owner is None:
        return []
    return [*_owned(completions, owner), *battles.not_an_open_battle_answer()]


def _owned(table: Any, owner: str | None) -> list[Any]:
    """The condition that a row belongs to ``owner`` (a key id); none for None (the admin)."""
    return [] if owner is None else [table.c.key_id == owner]
