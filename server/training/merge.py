"""Merging a LoRA adapter into its base: PEFT's ``merge_and_unload``, saved as a plain
checkpoint (safetensors + tokenizer) that the gateway serves like any other.

Idempotent: merging the same base and adapter into the same folder again finds the
folder's merge record and does nothing; a folder holding anything else is refused.

Owns: the compatibility checks and the merged folder. Does not know: training, HTTP, vLLM.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from server.models.adapter_meta import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MERGE_META_FILE,
    META_FILE,
    base_fingerprint,
    read_meta,
    write_json_atomic,
)
from server.telemetry.progress import Progress


class MergeError(ValueError):
    """The adapter does not fit the base, or the output folder holds something else."""


@dataclass(frozen=True, slots=True)
class MergeResult:
    out: Path
    merged: bool  # False: the folder already held this exact merge


def _digest(folder: Path, names: list[str]) -> str:
    h = hashlib.sha256()
    for name in names:
        path = folder / name
        if path.is_file():
            h.update(name.encode())
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def _weight_files(folder: Path) -> list[str]:
    return [*sorted(p.name for p in folder.glob("*.safetensors")), "config.json"]


def check_adapter(base: Path, adapter: Path) -> dict[str, Any]:
    """The adapter's PEFT config, after checking it is a LoRA whose base matches ``base``."""
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise MergeError(f"{adapter} is not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        raise MergeError(
            f"{adapter} has no {ADAPTER_WEIGHTS}; only safetensors adapters are loaded "
            "(a pickled adapter_model.bin is refused)"
        )
    if not (base / "config.json").is_file():
        raise MergeError(f"{base} is not a checkpoint folder (no config.json)")
    peft_config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    if peft_config.get("peft_type") != "LORA":
        raise MergeError(f"{adapter} is a {peft_config.get('peft_type')} adapter, not LoRA")
    meta = read_meta(adapter)
    if meta is not None:
        want = meta.get("base_model", {}).get("fingerprint")
        have = base_fingerprint(base)
        if want and want != have:
            raise MergeError(
                f"{adapter} was trained on a different base ({meta['base_model'].get('path')}, "
                f"fingerprint {want}); {base} has fingerprint {have}. Merge it into the base it "
                "was trained on."
            )
    return peft_config


def merge_adapter(
    base: Path,
    adapter: Path,
    out: Path,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    progress: Progress | None = None,
) -> MergeResult:
    """``base`` + ``adapter`` → a plain checkpoint in ``out`` (idempotent). ``device`` is a
    torch device (``server.resources.platform.training_device`` decides it); the sum is
    float32 wherever it runs, so a GPU needs 4 bytes per parameter free. ``progress`` hears
    of its three steps: load, merge, save."""

    def step(name: str) -> None:
        if progress is not None:
            progress.note(name)
            progress.update()

    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_adapter(base, adapter)
    record = {
        "base": str(base.resolve()),
        "base_digest": _digest(base, _weight_files(base)),
        "adapter": str(adapter.resolve()),
        "adapter_digest": _digest(adapter, [ADAPTER_CONFIG, ADAPTER_WEIGHTS]),
        "dtype": dtype,
    }
    if out.exists():
        previous = read_meta(out, MERGE_META_FILE)
        same = previous is not None and all(previous.get(k) == v for k, v in record.items())
        if same:
            return MergeResult(out=out, merged=False)
        if any(out.iterdir()):
            raise MergeError(
                f"{out} already holds something else; choose a new folder or remove it"
            )
    # W + BA is summed in float32 and rounded once: merging in bf16 also rounds BA, and a
    # small LoRA delta then loses a visible part of its effect (measured in the README).
    saved_dtype = AutoConfig.from_pretrained(str(base)).dtype if dtype == "auto" else dtype
    model = AutoModelForCausalLM.from_pretrained(
        str(base), dtype=torch.float32, trust_remote_code=trust_remote_code
    ).to(device)
    step("base loaded")
    try:
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as exc:
        # e.g. "size mismatch for ...lora_A.weight": trained on another architecture
        raise MergeError(f"{adapter} does not fit {base}: {exc}") from exc
    merged = merged.to(getattr(torch, str(saved_dtype).removeprefix("torch."), torch.float32))
    merged = merged.to("cpu")  # saved from host memory
    step("merged")
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(str(base), trust_remote_code=trust_remote_code)
    tokenizer.save_pretrained(str(tmp))
    # The prompt format travels with the weights: keep the adapter's metadata beside them.
    meta = read_meta(adapter)
    if meta is not None:
        write_json_atomic(tmp / META_FILE, meta)
    record["created"] = datetime.now(UTC).isoformat(timespec="seconds")
    write_json_atomic(tmp / MERGE_META_FILE, record)
    if out.exists():
        out.rmdir()  # empty, checked above
    tmp.rename(out)
    step("saved")
    return MergeResult(out=out, merged=True)
