"""Promotion aliases: ``NAME@latest`` is the name clients call, and it points at the version
of base model ``NAME`` that last won its gate (or was promoted by hand): the base itself at
first, later an iteration's adapter ``NAME-iterK``.

The book is kept in ``<adapters root>/promotions.json`` (written atomically), beside the
adapters it names, so a restarted gateway serves the same version under the alias.

Owns: the alias → version map, its history and its file. Does not know: engines, HTTP.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.models.adapter_meta import write_json_atomic

log = logging.getLogger(__name__)

LATEST = "latest"
PROMOTIONS_FILE = "promotions.json"
HISTORY_KEPT = 50


def latest_alias(base: str) -> str:
    return f"{base}@{LATEST}"


def base_of_alias(alias: str) -> str | None:
    """``NAME`` for ``NAME@latest``; None for anything else (model names never hold ``@``)."""
    base, sep, tag = alias.rpartition("@")
    return base if sep and tag == LATEST and base else None


@dataclass
class Promotion:
    version: str
    at: float
    by: str  # "gate" | "admin" | "start"
    reason: str = ""

    def public(self) -> dict[str, Any]:
        return {"version": self.version, "at": self.at, "by": self.by, "reason": self.reason}


@dataclass
class AliasBook:
    """alias → the version it serves, with each alias's history (newest last)."""

    path: Path | None = None  # None: not persisted (no adapters root)
    _current: dict[str, str] = field(default_factory=dict)
    _history: dict[str, list[Promotion]] = field(default_factory=dict)

    def resolve(self, name: str) -> str | None:
        return self._current.get(name)

    def items(self) -> list[tuple[str, str]]:
        return sorted(self._current.items())

    def history(self, alias: str) -> list[Promotion]:
        return list(self._history.get(alias, []))

    def pointing_at(self, version: str) -> list[str]:
        return [a for a, v in self._current.items() if v == version]

    def set(self, alias: str, version: str, *, by: str, reason: str = "") -> str | None:
        """Point ``alias`` at ``version``; returns the version it pointed at before."""
        previous = self._current.get(alias)
        self._current[alias] = version
        history = self._history.setdefault(alias, [])
        history.append(Promotion(version, time.time(), by, reason))
        del history[:-HISTORY_KEPT]
        if by != "start":
            self.save()
        return previous

    def saved(self) -> dict[str, str]:
        """The versions the file names (what a restart should serve again)."""
        if self.path is None or not self.path.is_file():
            return {}
        try:
            raw = json.loads(self.path.read_text())
            return {
                alias: str(entry["version"])
                for alias, entry in raw.get("aliases", {}).items()
                if base_of_alias(alias) and isinstance(entry, dict) and "version" in entry
            }
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("Ignoring unreadable %s: %s", self.path, exc)
            return {}

    def save(self) -> None:
        if self.path is None:
            return
        write_json_atomic(
            self.path,
            {
                "aliases": {
                    alias: {
                        "version": version,
                        "history": [p.public() for p in self._history.get(alias, [])],
                    }
                    for alias, version in sorted(self._current.items())
                }
            },
        )
