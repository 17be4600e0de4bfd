"""What text the store can keep, and the client error for what it cannot.

Every text column keeps valid Unicode without NUL, on SQLite and PostgreSQL alike:
PostgreSQL refuses NUL in ``text``, and no UTF-8 database encodes an unpaired UTF-16
surrogate (JSON can carry one: ``"\\ud800"``). A JSON column keeps NUL (it is stored
escaped) but never an unpaired surrogate. SQLite would keep some of these; the rule is the
same on both so that a deployment can move between them.

Owns: the rule (``problem``, ``first_problem``) and the refusal (``check_fields``,
``check_row``: ``InvalidRequest`` naming the field). Does not know: HTTP, which route
the text came through, SQL beyond a table's column types.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from sqlalchemy import JSON, Table

from server.errors import UNPAIRED_SURROGATES, InvalidRequest

NUL = "\x00"
_SURROGATE = re.compile("[\ud800-\udfff]")
NUL_PROBLEM = "must not contain NUL characters (\\u0000)"
SURROGATE_PROBLEM = UNPAIRED_SURROGATES


def problem(text: str, *, nul_ok: bool = False) -> str | None:
    """Why ``text`` cannot be stored (None: it can)."""
    if not nul_ok and NUL in text:
        return NUL_PROBLEM
    if _SURROGATE.search(text):
        return SURROGATE_PROBLEM
    return None


def first_problem(value: Any, *, nul_ok: bool = False) -> str | None:
    """The first ``problem`` of any string in ``value`` (strings, lists, tuples, dicts
    with their keys, dataclasses); None when there is none."""
    if isinstance(value, str):
        return problem(value, nul_ok=nul_ok)
    if isinstance(value, Mapping):
        items: Any = (x for pair in value.items() for x in pair)
    elif isinstance(value, list | tuple | set | frozenset):
        items = value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = (getattr(value, f.name) for f in dataclasses.fields(value))
    else:
        return None
    for item in items:
        found = first_problem(item, nul_ok=nul_ok)
        if found:
            return found
    return None


def check_fields(**fields: Any) -> None:
    """Refuse the first field whose text cannot be stored in a text column."""
    for name, value in fields.items():
        found = first_problem(value)
        if found:
            raise InvalidRequest(f"`{name}` {found}.", param=name)


def check_row(table: Table, values: Mapping[str, Any]) -> None:
    """Refuse a row for ``table`` holding text its columns cannot keep (JSON columns keep
    NUL)."""
    for name, value in values.items():
        found = first_problem(value, nul_ok=isinstance(table.c[name].type, JSON))
        if found:
            raise InvalidRequest(f"`{name}` {found}.", param=name)
