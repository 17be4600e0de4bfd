"""The store: completion records and feedback, in SQLite or PostgreSQL.

The only package that knows SQL. Knows rows, not engines or templates.
"""

from server.store.battles import HUMAN, WINNERS, BattleCreate, BattleRow, judge_source
from server.store.database import open_engine, sqlite_url
from server.store.records import (
    ANONYMOUS_KEY,
    ChoiceRecord,
    CompletionRecord,
    FeedbackCreate,
    FeedbackRow,
)
from server.store.store import Store

__all__ = [
    "ANONYMOUS_KEY",
    "HUMAN",
    "WINNERS",
    "BattleCreate",
    "BattleRow",
    "ChoiceRecord",
    "CompletionRecord",
    "FeedbackCreate",
    "FeedbackRow",
    "Store",
    "judge_source",
    "open_engine",
    "sqlite_url",
]
