"""Tables of the store, and the bodies of its first schema revisions.

Owns: table definitions. Schema changes are Alembic revisions (``store/migrations``); the
first seven call the hand-written migrations below (``MIGRATIONS``), which databases made
before Alembic recorded in ``aligngate_migrations`` (``database.migrate`` stamps them). A
later change is a revision of its own, never an edit of these.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Connection,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
    inspect,
    select,
    text,
    update,
)

metadata = MetaData()

completions = Table(
    "completions",
    metadata,
    Column("id", String(64), primary_key=True),  # the chatcmpl-…/cmpl-… the client saw
    Column("created_at", Float, nullable=False),
    Column("endpoint", String(32), nullable=False),  # chat | completions
    Column("model", String(128), nullable=False),
    Column("family", String(32), nullable=False),
    Column("adapter", String(128)),
    Column("template_fingerprint", String(32), nullable=False),
    Column("request", JSON, nullable=False),  # messages or prompt, as sent
    Column("prompt_text", Text, nullable=False),  # as rendered for the engine
    Column("sampling", JSON, nullable=False),
    Column("choices", JSON, nullable=False),  # [{index, text, finish_reason, token_ids, ...}]
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("latency_ms", Float, nullable=False),
    Column("status", String(16), nullable=False),  # finished | aborted | error
    Column("key_id", String(64)),
    Column("user", String(256)),
    # The ids the engine received (m002); each choice's output ids live in ``choices``.
    Column("prompt_token_ids", JSON),
    # m002: the BOS token's text when the engine put BOS before ``prompt_text`` (TRL exports).
    Column("prompt_bos", String(64)),
    Column("request_id", String(128)),  # m007: the request's x-request-id
    Index("ix_completions_model_created", "model", "created_at"),
)

feedback = Table(
    "feedback",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("created_at", Float, nullable=False),
    Column("completion_id", String(64), ForeignKey("completions.id"), nullable=False),
    Column("choice_index", Integer, nullable=False),
    Column("model", String(128), nullable=False),
    Column("judgment", Text),
    Column("rating", Integer),
    Column("rating_scale", String(8)),  # thumbs (-1/+1) | stars (1-5)
    Column("label", String(16)),
    Column("preferred_over", String(64), ForeignKey("completions.id")),
    Column("preferred_over_choice", Integer),  # m002; None on older rows: choice 0
    Column("annotator", String(256)),
    Column("key_id", String(64), nullable=False),
    Column("idempotency_key", String(256)),
    Column("payload_hash", String(64), nullable=False),
    Column("reviewed", Boolean, nullable=False, default=False),
    # m002: the commit order (see ``counters``); iterations select by it, not by time.
    Column("seq", BigInteger),
    # m006: an explicit scalar reward (a user's own, or a score judge's score on [0, 1]);
    # None: the reward is the rating's or the label's (see ``FeedbackRow.reward``).
    Column("reward", Float),
    Column("request_id", String(128)),  # m007: the request's x-request-id
    UniqueConstraint("key_id", "idempotency_key", name="uq_feedback_idempotency"),
    Index("ix_feedback_created", "created_at", "id"),
    Index("ix_feedback_completion", "completion_id"),
)

# One row per sequence. A writer bumps the row in the same transaction as its insert, so the
# row stays locked until commit: numbers become visible in commit order, and once value N is
# visible every row numbered ≤ N is too (a watermark no in-flight write can fall under).
counters = Table(
    "counters",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

FEEDBACK_SEQUENCE = "feedback"

# A completion's ``metadata`` (OpenAI's Stored Completions), one row per pair: exact-match
# filters on key and value read the same on SQLite and PostgreSQL, whatever a key contains
# (a JSON path would need quoting each database spells its own way).
completion_metadata = Table(
    "completion_metadata",
    metadata,
    Column("completion_id", String(64), ForeignKey("completions.id"), primary_key=True),
    Column("key", String(64), primary_key=True),
    Column("value", String(512), nullable=False),
    Index("ix_completion_metadata_pair", "key", "value"),
)

# m004: one row per arena battle — two models' answers to one conversation — and its outcome.
# ``source`` says who judged it: "human" (an arena vote) or "judge:<name>" (an AI judge's
# pairwise verdict), which is what the leaderboard filters on. ``winner`` is None until the
# vote; "tie" and "both_bad" are kept as such (the leaderboard counts both as a tie).
battles = Table(
    "battles",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("created_at", Float, nullable=False),
    Column("source", String(128), nullable=False),
    Column("key_id", String(64), nullable=False),  # whose battle (tenancy, as completions)
    Column("model_a", String(128), nullable=False),
    Column("model_b", String(128), nullable=False),
    Column("completion_a", String(64), ForeignKey("completions.id")),
    Column("choice_a", Integer, nullable=False, default=0),
    Column("completion_b", String(64), ForeignKey("completions.id")),
    Column("choice_b", Integer, nullable=False, default=0),
    Column("messages", JSON),  # the conversation both answered, as sent
    Column("winner", String(16)),  # a | b | tie | both_bad; None: not judged yet
    Column("voted_at", Float),
    Column("annotator", String(256)),
    # The preference feedback a decisive vote became (None: a tie, both bad, or answers
    # rendered from different prompt text, which the store does not pair).
    Column("feedback_id", String(64), ForeignKey("feedback.id")),
    Index("ix_battles_source_voted", "source", "voted_at"),
    Index("ix_battles_key", "key_id", "created_at"),
)

# One row per verdict an AI judge gave (never for an unparseable reply): who judged, with
# which prompt version, what it replied and how long it took. ``feedback_id`` is the feedback
# row the verdict became (None for a pairwise tie, which is no preference). The completion is
# not a foreign key: this is a log of calls, and a completion deleted later keeps its history.
judge_calls = Table(
    "judge_calls",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("created_at", Float, nullable=False),
    Column("judge", String(64), nullable=False),
    Column("kind", String(16), nullable=False),  # judgment | score | pairwise
    Column("judge_model", String(256), nullable=False),
    Column("prompt_version", String(160), nullable=False),  # file name @ content hash
    Column("completion_id", String(64), nullable=False),
    Column("choice_index", Integer, nullable=False),
    Column("other_choice_index", Integer),  # pairwise: the choice shown as B first
    Column("feedback_id", String(64), ForeignKey("feedback.id")),
    Column("verdict", JSON, nullable=False),  # the parsed verdict
    Column("raw_replies", JSON, nullable=False),  # the judge's replies, one per request order
    Column("latency_ms", Float, nullable=False),
    Column("requests", Integer, nullable=False),  # HTTP attempts, retries included
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("source", String(16), nullable=False),  # cli | live
    Index("ix_judge_calls_completion", "completion_id", "judge"),
    Index("ix_judge_calls_judge_created", "judge", "created_at"),
)

migrations_table = Table(
    "aligngate_migrations",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("applied_at", Float, nullable=False),
)


# Columns added after m001. m001 creates tables from today's definitions, so a new database
# already has them; the migration adds only what an older database lacks.
_M002_COLUMNS = {
    "completions": [("prompt_token_ids", "JSON"), ("prompt_bos", "VARCHAR(64)")],
    "feedback": [("preferred_over_choice", "INTEGER"), ("seq", "BIGINT")],
}


def _m001_initial(conn: Connection) -> None:
    completions.create(conn)
    feedback.create(conn)


def _m002_token_ids_and_sequence(conn: Connection) -> None:
    for table, columns in _M002_COLUMNS.items():
        present = {c["name"] for c in inspect(conn).get_columns(table)}
        for name, sql_type in columns:
            if name not in present:
                conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}"))
    counters.create(conn, checkfirst=True)
    # Number existing feedback in creation order; new rows continue from there.
    ids = (
        conn.execute(
            select(feedback.c.id)
            .where(feedback.c.seq.is_(None))
            .order_by(feedback.c.created_at, feedback.c.id)
        )
        .scalars()
        .all()
    )
    start = conn.execute(select(func.coalesce(func.max(feedback.c.seq), 0))).scalar_one()
    for offset, row_id in enumerate(ids, start=1):
        conn.execute(update(feedback).where(feedback.c.id == row_id).values(seq=start + offset))
    conn.execute(counters.insert().values(name=FEEDBACK_SEQUENCE, value=start + len(ids)))
    conn.execute(text("CREATE UNIQUE INDEX IF NOT EXISTS ix_feedback_seq ON feedback (seq)"))


def _m003_completion_metadata(conn: Connection) -> None:
    completion_metadata.create(conn, checkfirst=True)


def _m004_battles(conn: Connection) -> None:
    battles.create(conn, checkfirst=True)


def _m005_judge_calls(conn: Connection) -> None:
    judge_calls.create(conn, checkfirst=True)


def _m006_feedback_reward(conn: Connection) -> None:
    # DOUBLE PRECISION: what m001's Float is on PostgreSQL (FLOAT); REAL affinity on SQLite.
    if "reward" not in {c["name"] for c in inspect(conn).get_columns("feedback")}:
        conn.execute(text("ALTER TABLE feedback ADD COLUMN reward DOUBLE PRECISION"))


def _m007_request_ids(conn: Connection) -> None:
    for table in ("completions", "feedback"):
        if "request_id" not in {c["name"] for c in inspect(conn).get_columns(table)}:
            conn.execute(text(f"ALTER TABLE {table} ADD COLUMN request_id VARCHAR(128)"))


# Frozen: revisions m001…m007 apply these (one transaction each); names as databases made
# before Alembic recorded them.
MIGRATIONS: list[tuple[str, Callable[[Connection], None]]] = [
    ("m001_completions_and_feedback", _m001_initial),
    ("m002_token_ids_and_feedback_sequence", _m002_token_ids_and_sequence),
    ("m003_completion_metadata", _m003_completion_metadata),
    ("m004_battles", _m004_battles),
    ("m005_judge_calls", _m005_judge_calls),
    ("m006_feedback_reward", _m006_feedback_reward),
    ("m007_request_ids", _m007_request_ids),
]
