"""The metadata file written beside every adapter (and every merged checkpoint): which base
it was trained on, the prompt format it was trained with, the method, data and
hyper-parameters — the prompt style travels with the weights, as litgpt does it.

Owns: the file's name and fields, and the base-model fingerprint used to match adapters to
bases. Does not know: torch, peft or vLLM.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
META_FILE = "aligngate-adapter.json"
MERGE_META_FILE = "aligngate-merge.json"
# The config fields that decide whether an adapter's weights fit a base.
_SHAPE_FIELDS = (
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "n_embd",
    "n_layer",
    "n_head",
)


def base_fingerprint(model_dir: str | Path) -> str:
    """A hash of a checkpoint's architecture and shapes (config.json), so an adapter trained
    on it, or on a merge of it, is recognised as fitting."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FileNotFoundError(f"{model_dir} has no readable config.json: {exc}") from exc
    shape = {k: config.get(k) for k in _SHAPE_FIELDS if k in config}
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


def read_meta(folder: str | Path, name: str = META_FILE) -> dict[str, Any] | None:
    path = Path(folder) / name
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"unreadable metadata {path}: {exc}") from exc
    return data if isinstance(data, dict) else None


def write_json_atomic(path: Path, data: Any) -> None:
    """Written beside the target, then renamed: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)
    os.replace(tmp, path)
