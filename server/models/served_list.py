"""The adapters a cluster's front ends serve, as one file in the adapters root that every
front end reads: ``<adapters root>/served-<namespace>.json``, ``{name: {path, base}}``.

A front end that loads or unloads an adapter (``/admin/adapters``, an online iteration)
writes it here; the others pick the change up the next time they list or look up a model,
so every front end lists the same ``/v1/models``. Writes take an exclusive ``flock`` on a
lock file beside it (read, change, replace atomically), so two front ends writing at once
both land. A restarted front end serves the listed adapters again, as the promotions file
does for aliases.

Owns: the file's name, format and locking. Does not know: engines, HTTP.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
from collections.abc import Iterator
from pathlib import Path

from server.models.adapter_meta import write_json_atomic

log = logging.getLogger(__name__)


class ServedList:
    """Name → ``{"path": PATH (relative to the root), "base": MODEL}``."""

    def __init__(self, root: Path, namespace: str) -> None:
        self.path = root / f"served-{namespace}.json"
        self._lock_path = root / f".served-{namespace}.lock"
        # (inode, mtime_ns, size) of the last read: each write replaces the file (a new
        # inode), so a change within the clock's resolution is seen too.
        self._seen: tuple[int, int, int] | None = None

    def changed(self) -> bool:
        """Whether the file changed since ``read`` last looked (one ``stat``)."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return self._seen is not None
        return self._seen != (stat.st_ino, stat.st_mtime_ns, stat.st_size)

    def read(self) -> dict[str, dict[str, str]]:
        try:
            stat = self.path.stat()
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            self._seen = None
            return {}
        except (OSError, ValueError) as exc:
            log.warning("Ignoring unreadable %s: %s", self.path, exc)
            return {}
        self._seen = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        return {
            str(name): {"path": str(v["path"]), "base": str(v["base"])}
            for name, v in (raw.get("adapters") or {}).items()
            if isinstance(v, dict) and "path" in v and "base" in v
        }

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._lock_path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock_path.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def put(self, name: str, path: str, base: str) -> None:
        with self._locked():
            adapters = self.read()
            adapters[name] = {"path": path, "base": base}
            self._write(adapters)

    def remove(self, name: str) -> None:
        with self._locked():
            adapters = self.read()
            if adapters.pop(name, None) is not None:
                self._write(adapters)

    def _write(self, adapters: dict[str, dict[str, str]]) -> None:
        write_json_atomic(self.path, {"adapters": dict(sorted(adapters.items()))})
        stat = self.path.stat()
        self._seen = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
