"""Arena battles in the store: two models' answers to one conversation, and who won.

Owns: the battle rows and their SQL — recording a battle, the one vote it takes, and the
outcomes the leaderboard rates. A decisive vote (``a`` or ``b``) also becomes preference
feedback (a DPO pair in the exports) in the same transaction, when both answers were rendered
from the same prompt text; ``tie`` and ``both_bad`` stay battle outcomes only.
Does not know: engines, HTTP, how ratings are computed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Connection, select, update

from server.errors import Conflict, InvalidRequest, NotFound
from server.store.records import CompletionRecord, FeedbackCreate, FeedbackRow
from server.store.schema import battles, completions
from server.store.storable import check_fields, check_row

InsertFeedback = Callable[[Connection, FeedbackCreate, str | None], tuple[FeedbackRow, bool]]
WINNERS = ("a", "b", "tie", "both_bad")
HUMAN = "human"
JUDGE_PREFIX = "judge:"

# Why a decisive vote stored no preference (``BattleRow.preference_note``).
DIFFERENT_PROMPTS = (
    "the two answers were rendered from different prompt text (different templates), so "
    "they do not make one DPO pair; the vote counts on the leaderboard only"
)


def judge_source(name: str) -> str:
    """The ``source`` of battles an AI judge decided."""
    return f"{JUDGE_PREFIX}{name}"


@dataclass(slots=True)
class BattleCreate:
    """A battle to record. Arena battles start open (``winner`` None) and are voted later; a
    judge's pairwise verdict is recorded decided (``winner`` set) with its own ``source``."""

    model_a: str
    model_b: str
    key_id: str
    source: str = HUMAN
    completion_a: str | None = None
    completion_b: str | None = None
    choice_a: int = 0
    choice_b: int = 0
    messages: Any = None
    winner: str | None = None
    annotator: str | None = None

    def __post_init__(self) -> None:
        if self.winner is not None and self.winner not in WINNERS:
            raise InvalidRequest(f"winner must be one of {list(WINNERS)}", param="winner")
        if self.model_a == self.model_b:
            raise InvalidRequest("A battle needs two different models.", param="models")


@dataclass(slots=True)
class BattleRow:
    id: str
    created_at: float
    source: str
    key_id: str
    model_a: str
    model_b: str
    completion_a: str | None
    choice_a: int
    completion_b: str | None
    choice_b: int
    messages: Any
    winner: str | None
    voted_at: float | None
    annotator: str | None
    feedback_id: str | None
    # Not stored: filled by reads that join the completions (``answers``) or by a vote.
    answer_a: tuple[str, str | None] | None = None  # (text, finish_reason)
    answer_b: tuple[str, str | None] | None = None
    preference_note: str | None = None

    @classmethod
    def from_row(cls, row: Any) -> BattleRow:
        return cls(**dict(row._mapping))

    def values(self) -> dict[str, Any]:
        values = asdict(self)
        for transient in ("answer_a", "answer_b", "preference_note"):
            values.pop(transient)
        return values


def insert_battle(conn: Connection, new: BattleCreate) -> BattleRow:
    now = time.time()
    for column in ("completion_a", "completion_b"):
        completion_id = getattr(new, column)
        if completion_id is not None and _record(conn, completion_id) is None:
            raise NotFound(f"No stored completion `{completion_id}`.", param=column)
    row = BattleRow(
        id=f"battle-{uuid.uuid4().hex}",
        created_at=now,
        source=new.source,
        key_id=new.key_id,
        model_a=new.model_a,
        model_b=new.model_b,
        completion_a=new.completion_a,
        choice_a=new.choice_a,
        completion_b=new.completion_b,
        choice_b=new.choice_b,
        messages=new.messages,
        winner=new.winner,
        voted_at=now if new.winner is not None else None,
        annotator=new.annotator,
        feedback_id=None,
    )
    values = row.values()
    check_row(battles, values)
    conn.execute(battles.insert().values(**values))
    return row


def select_battle(conn: Connection, battle_id: str, owner: str | None) -> BattleRow:
    """The battle with its answers' texts; another key's battle reads as missing."""
    conditions = [battles.c.id == battle_id]
    if owner is not None:
        conditions.append(battles.c.key_id == owner)
    found = conn.execute(select(battles).where(*conditions)).first()
    if found is None:
        raise NotFound(f"No battle `{battle_id}`.", param="battle_id")
    row = BattleRow.from_row(found)
    for side in ("a", "b"):
        completion_id = getattr(row, f"completion_{side}")
        record = _record(conn, completion_id) if completion_id is not None else None
        if record is not None:
            choice = record.choices[getattr(row, f"choice_{side}")]
            setattr(row, f"answer_{side}", (choice.text, choice.finish_reason))
    return row


def not_an_open_battle_answer() -> list[Any]:
    """The condition that a completion is not an answer of a battle still open: a blind
    battle's answers name their models, so until the vote they read as missing to the voter
    on every route (lists, retrieve, messages, update, delete, feedback); the admin sees all."""
    open_battles = battles.c.winner.is_(None)
    return [
        completions.c.id.not_in(
            select(battles.c.completion_a).where(open_battles, battles.c.completion_a.is_not(None))
        ),
        completions.c.id.not_in(
            select(battles.c.completion_b).where(open_battles, battles.c.completion_b.is_not(None))
        ),
    ]


def vote(
    conn: Connection,
    battle_id: str,
    winner: str,
    *,
    owner: str | None,
    key_id: str,
    annotator: str | None,
    insert_feedback: InsertFeedback,
) -> tuple[BattleRow, FeedbackRow | None]:
    """Record the battle's one vote; a second one is a 409. ``insert_feedback`` is the store's
    feedback insert (its checks included), run in this same transaction."""
    if winner not in WINNERS:
        raise InvalidRequest(f"winner must be one of {list(WINNERS)}", param="winner")
    check_fields(battle_id=battle_id, annotator=annotator)
    row = select_battle(conn, battle_id, owner)
    if row.winner is not None:
        raise Conflict(f"Battle `{battle_id}` was already voted on.", param="winner")
    preference: FeedbackRow | None = None
    if winner in ("a", "b") and row.completion_a and row.completion_b:
        sides = {"a": (row.completion_a, row.choice_a), "b": (row.completion_b, row.choice_b)}
        chosen_id, chosen_choice = sides[winner]
        rejected_id, rejected_choice = sides["b" if winner == "a" else "a"]
        chosen_record, rejected_record = _record(conn, chosen_id), _record(conn, rejected_id)
        assert chosen_record is not None and rejected_record is not None  # foreign keys
        if chosen_record.prompt_of(chosen_choice) == rejected_record.prompt_of(rejected_choice):
            preference, _ = insert_feedback(
                conn,
                FeedbackCreate(
                    completion_id=chosen_id,
                    choice_index=chosen_choice,
                    preferred_over=rejected_id,
                    preferred_over_choice=rejected_choice or None,
                    annotator=annotator,
                    key_id=key_id,
                ),
                None,  # the battle's ownership was checked above
            )
        else:
            row.preference_note = DIFFERENT_PROMPTS
    now = time.time()
    done = conn.execute(
        update(battles)
        .where(battles.c.id == battle_id, battles.c.winner.is_(None))
        .values(
            winner=winner,
            voted_at=now,
            annotator=annotator,
            feedback_id=preference.id if preference is not None else None,
        )
    )
    if done.rowcount != 1:  # cannot happen with one writer; kept as the guard it states
        raise Conflict(f"Battle `{battle_id}` was already voted on.", param="winner")
    row.winner, row.voted_at, row.annotator = winner, now, annotator
    row.feedback_id = preference.id if preference is not None else None
    return row, preference


def select_outcomes(
    conn: Connection, *, source: str | None, owner: str | None
) -> list[tuple[str, str, str]]:
    """(model_a, model_b, winner) of every decided battle, oldest first."""
    conditions = [battles.c.winner.is_not(None)]
    if source is not None:
        conditions.append(battles.c.source == source)
    if owner is not None:
        conditions.append(battles.c.key_id == owner)
    query = (
        select(battles.c.model_a, battles.c.model_b, battles.c.winner)
        .where(*conditions)
        .order_by(battles.c.voted_at, battles.c.id)
    )
    return [(a, b, w) for a, b, w in conn.execute(query).all()]


def select_sources(conn: Connection, *, owner: str | None) -> list[str]:
    """The sources that decided at least one battle (for the leaderboard's filter)."""
    query = select(battles.c.source).where(battles.c.winner.is_not(None)).distinct()
    if owner is not None:
        query = query.where(battles.c.key_id == owner)
    return sorted(s for (s,) in conn.execute(query).all())


def _record(conn: Connection, completion_id: str) -> CompletionRecord | None:
    found = conn.execute(select(completions).where(completions.c.id == completion_id)).first()
    return CompletionRecord.from_row(found) if found is not None else None
