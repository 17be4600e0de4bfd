"""Promotion aliases: ``NAME@latest`` is the name clients call, and it points at the version
of base model ``NAME`` that last won its gate (or was promoted by hand): the base itself at
first, later an iteration's adapter ``NAME-iterK``.

The book is kept in ``<adapters root>/promotions.json`` (written atomically), beside the
adapters it names, so a restarted gateway serves the same version under the alias. Several
front ends of one cluster share the root and so the file: a promotion takes an exclusive
``flock`` beside it (read, change, replace), and every look-up picks up what another front
end promoted (``sync``: one ``stat`` while nothing changed).

Owns: the alias → version map, its history and its file. Does not know: engines, HTTP.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import time
from collections.abc import Callable, Iterator
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
    _seen: tuple[int, int, int] | None = None  # the file's ``_stat`` at the last read/write

    def resolve(self, name: str) -> str | None:
        return self._current.get(name)

    def items(self) -> list[tuple[str, str]]:
        return sorted(self._current.items())

    def history(self, alias: str) -> list[Promotion]:
        return list(self._history.get(alias, []))

    def pointing_at(self, version: str) -> list[str]:
        return [a for a, v in self._current.items() if v == version]

    def set(self, alias: str, version: str, *, by: str, reason: str = "") -> str | None:
        """Point ``alias`` at ``version``; returns the version it pointed at before. A
        promotion (``by`` other than ``start``) reads the file first under its lock, so what
        other front ends promoted meanwhile is kept."""
        persist = by != "start"
        with self._file_lock() if persist else contextlib.nullcontext():
            if persist:
                self.sync()
            previous = self._current.get(alias)
            self._current[alias] = version
            history = self._history.setdefault(alias, [])
            history.append(Promotion(version, time.time(), by, reason))
            del history[:-HISTORY_KEPT]
            if persist:
                self.save()
        return previous

    def saved(self) -> dict[str, str]:
        """The versions the file names (what a restart should serve again)."""
        return {alias: entry["version"] for alias, entry in self._read().items()}

    def sync(self, served: Callable[[str], bool] = lambda version: True) -> bool:
        """Take up what the file says when it changed since this book last read or wrote
        it (another front end promoted), for the aliases whose version is ``served`` here;
        True when it read the file."""
        if self.path is None or self._stat() == self._seen:
            return False
        for alias, entry in self._read().items():
            if not served(entry["version"]):
                continue
            self._current[alias] = entry["version"]
            self._history[alias] = entry["history"]
        return True

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
        self._seen = self._stat()

    def _stat(self) -> tuple[int, int, int] | None:
        """(inode, mtime, size): each write replaces the file, so any change shows."""
        assert self.path is not None
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        return (stat.st_ino, stat.st_mtime_ns, stat.st_size)

    def _read(self) -> dict[str, dict[str, Any]]:
        """alias → {version, history} as the file has them; {} without a readable file."""
        if self.path is None:
            return {}
        seen = self._stat()
        try:
            raw = json.loads(self.path.read_text())
            aliases = {
                alias: {
                    "version": str(entry["version"]),
                    "history": [
                        Promotion(str(p["version"]), float(p["at"]), str(p["by"]), str(p["reason"]))
                        for p in entry.get("history", [])
                    ][-HISTORY_KEPT:],
                }
                for alias, entry in raw.get("aliases", {}).items()
                if base_of_alias(alias) and isinstance(entry, dict) and "version" in entry
            }
        except FileNotFoundError:
            aliases = {}
        except (OSError, ValueError, AttributeError, KeyError, TypeError) as exc:
            log.warning("Ignoring unreadable %s: %s", self.path, exc)
            aliases = {}
        self._seen = seen
        return aliases

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        if self.path is None:
            yield
            return
        with (self.path.parent / f".{self.path.name}.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
