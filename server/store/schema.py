"""Tables of the store, and the append-only list of schema migrations.

Owns: table definitions. A migration is appended, never edited: databases record which
ones they have applied (``aligngate_migrations``) and apply the rest in order.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import (
    JSON,
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
    Column("choices", JSON, nullable=False),  # [{index, text, finish_reason}]
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("latency_ms", Float, nullable=False),
    Column("status", String(16), nullable=False),  # finished | aborted | error
    Column("key_id", String(64)),
    Column("user", String(256)),
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
    Column("annotator", String(256)),
    Column("key_id", String(64), nullable=False),
    Column("idempotency_key", String(256)),
    Column("payload_hash", String(64), nullable=False),
    Column("reviewed", Boolean, nullable=False, default=False),
    UniqueConstraint("key_id", "idempotency_key", name="uq_feedback_idempotency"),
    Index("ix_feedback_created", "created_at", "id"),
    Index("ix_feedback_completion", "completion_id"),
)

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

migrations_table = Table(
    "aligngate_migrations",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("applied_at", Float, nullable=False),
)


def _m001_initial(conn: Connection) -> None:
    completions.create(conn)
    feedback.create(conn)


def _m002_completion_metadata(conn: Connection) -> None:
    completion_metadata.create(conn, checkfirst=True)


# Append only. Each entry: (name, function applied inside one transaction).
MIGRATIONS: list[tuple[str, Callable[[Connection], None]]] = [
    ("m001_completions_and_feedback", _m001_initial),
    ("m002_completion_metadata", _m002_completion_metadata),
]
