"""Adapter folders on disk: where they may live, what a loadable one contains.

Adapters are referred to by a name or a path relative to the adapters root; the resolved
folder (``realpath``, so symlinks are followed first) must lie inside the root. Only
safetensors weights are accepted: a pickled ``adapter_model.bin`` can run code when loaded.

Owns: path confinement and the adapter folder checks. Does not know: vLLM, HTTP.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from server.models.adapter_meta import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_meta


class AdapterFileError(ValueError):
    """An adapter reference that escapes the root, or a folder that is not a LoRA adapter."""


@dataclass(frozen=True, slots=True)
class AdapterFolder:
    path: Path
    rank: int
    target_modules: list[str]
    meta: dict[str, Any] | None  # aligngate-adapter.json, when the training module wrote it


def resolve_adapter(root: Path, ref: str) -> Path:
    """The folder ``ref`` names under ``root``; refuses absolute paths, ``..`` and symlinks
    that lead out of the root."""
    if not ref or "\x00" in ref:
        raise AdapterFileError("an adapter path must be a non-empty relative path")
    rel = PurePosixPath(ref.replace("\\", "/"))
    if rel.is_absolute() or ref.startswith(("/", "\\")) or (len(ref) > 1 and ref[1] == ":"):
        raise AdapterFileError(
            f"adapter path {ref!r} is absolute; give a path relative to the adapters root"
        )
    if ".." in rel.parts:
        raise AdapterFileError(f"adapter path {ref!r} may not contain '..'")
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, *rel.parts))
    if os.path.commonpath([real_root, real]) != real_root or real == real_root:
        raise AdapterFileError(f"adapter path {ref!r} leads outside the adapters root")
    return Path(real)


def inspect_adapter(folder: Path) -> AdapterFolder:
    if not folder.is_dir():
        raise AdapterFileError(f"no adapter folder {folder.name!r} in the adapters root")
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        raise AdapterFileError(f"{folder.name!r} is not a PEFT adapter (no {ADAPTER_CONFIG})")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise AdapterFileError(
            f"{folder.name!r} has no {ADAPTER_WEIGHTS}: only safetensors adapter weights are "
            "loaded (a pickled adapter_model.bin is refused)"
        )
    try:
        config = json.loads(config_path.read_text())
        meta = read_meta(folder)
    except (OSError, ValueError) as exc:
        raise AdapterFileError(f"{folder.name!r}: unreadable adapter files ({exc})") from exc
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise AdapterFileError(f"{folder.name!r} is not a LoRA adapter")
    targets = config.get("target_modules") or []
    return AdapterFolder(
        path=folder,
        rank=int(config.get("r", 0)),
        target_modules=sorted(targets) if isinstance(targets, list) else [str(targets)],
        meta=meta,
    )


def adapter_id(name: str, folder: Path) -> int:
    """The LoRA id an engine keys ``name`` by: the same for the same name and files in every
    front end and after a restart, and a different one when the files change.

    An engine caches an adapter's weights by this id (vLLM's LRU): replicas shared by
    several front ends, or that outlive a restarted one, would otherwise serve another
    adapter's cached weights under a counter's reused id."""
    digest = hashlib.sha256(name.encode())
    digest.update(str(folder).encode())
    for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        stat = (folder / file).stat()
        digest.update(f"{file}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return int.from_bytes(digest.digest()[:4], "big") % (2**31 - 1) + 1
