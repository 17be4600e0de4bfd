"""One models-file entry from a `vllm serve`-style command line: ``aligngate serve MODEL
[engine flags]`` serves MODEL as if a models file held one entry for it.

Owns: where each engine argument goes. Those a models-file entry sets with a field of its
own (``ENGINE_ARGS_AS_ENTRY_FIELDS``: the name, the dtype, LoRA, memory, ...) go there,
with vLLM's meaning; every other one goes into the entry's ``engine_args`` as parsed.
Does not know: parsing (vLLM's own parser does it, ``engine.engine_flags``) or serving.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from server.models.models_file import (
    MODEL_NAME_PATTERN,
    LoraSettings,
    ModelEntry,
    ModelsFileError,
    SamplingDefaults,
    default_entries,
)

log = logging.getLogger(__name__)

_LORA_ARGS = {
    "max_lora_rank": "max_rank",
    "max_loras": "max_loras",
    "max_cpu_loras": "max_cpu_loras",
}
# vLLM's --override-generation-config names max_tokens as the generation config does.
_GENERATION_CONFIG_NAMES = {"max_new_tokens": "max_tokens"}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def served_name(model: str, served_model_name: list[str] | None) -> str:
    """``--served-model-name``, else MODEL as given (as vLLM names it) when it is a valid
    model name, else the folder's own name (an absolute path cannot be a name in a URL)."""
    if served_model_name:
        if len(served_model_name) > 1:
            raise ModelsFileError(
                "--served-model-name: give one name; the gateway serves each model under one name"
            )
        return served_model_name[0]
    if re.match(MODEL_NAME_PATTERN, model):
        return model
    return Path(model).resolve().name


def entry_from_engine_args(
    given: dict[str, Any],
    defaults: dict[str, Any],
    *,
    model: str | None,
    family: str | None = None,
) -> ModelEntry:
    """The entry ``aligngate serve [MODEL] [engine flags]`` serves. ``given``: the engine
    arguments the command line set (``engine.engine_flags``); ``defaults``: vLLM's for the
    rest. No MODEL: the embedded default model, with those flags."""
    given = dict(given)
    model = given.pop("model", None) or model
    names = given.pop("served_model_name", None)
    if model is None:
        base = default_entries()[0]
        fields: dict[str, Any] = base.model_dump(exclude={"engine_args"})
        if names:
            fields["name"] = served_name("", names)
    else:
        folder = Path(model).expanduser()
        if not folder.is_dir():
            raise ModelsFileError(
                f"MODEL {model!r} is not a folder; `aligngate serve` serves a local "
                "checkpoint folder (nothing is downloaded from a model hub)"
            )
        fields = {"name": served_name(model, names), "path": str(folder.resolve())}
    if family is not None:
        fields["family"] = family

    for name in ("max_model_len", "dtype", "seed", "trust_remote_code", "gpu_memory_utilization"):
        if name in given:
            fields[name] = given.pop(name)
    if "generation_config" in given:
        setting = str(given.pop("generation_config"))
        fields["generation_config"] = (
            setting if setting in ("auto", "vllm") else str(Path(setting).resolve())
        )
    if "override_generation_config" in given:
        overrides = given.pop("override_generation_config") or {}
        fields["sampling"] = _sampling(overrides)
    if "tensor_parallel_size" in given:
        fields["devices"] = list(range(int(given.pop("tensor_parallel_size"))))
    fields["lora"] = _lora(given, defaults, fields.get("lora"))
    try:
        return ModelEntry(**fields, engine_args=given)
    except ValidationError as exc:
        raise ModelsFileError(f"invalid engine flags for {fields['name']!r}:\n{exc}") from exc


def _sampling(overrides: dict[str, Any]) -> SamplingDefaults:
    values = {_GENERATION_CONFIG_NAMES.get(k, k): v for k, v in overrides.items()}
    unknown = sorted(set(values) - set(SamplingDefaults.model_fields))
    if unknown:
        raise ModelsFileError(
            f"--override-generation-config: the gateway's sampling defaults take "
            f"{', '.join(sorted(SamplingDefaults.model_fields))}; not {', '.join(unknown)}"
        )
    try:
        return SamplingDefaults(**values)
    except ValidationError as exc:
        raise ModelsFileError(f"--override-generation-config: {exc}") from exc


def _lora(
    given: dict[str, Any], defaults: dict[str, Any], base: dict[str, Any] | None
) -> LoraSettings | None:
    """``--enable-lora`` with vLLM's own defaults for the sizes it leaves out; the embedded
    default model serves LoRA already (so `aligngate align` can hot-load), with the
    gateway's defaults. LoRA sizes without LoRA change nothing, as in vLLM."""
    enabled = bool(given.pop("enable_lora", False))
    sizes = {field: given.pop(arg) for arg, field in _LORA_ARGS.items() if arg in given}
    if not enabled and base is None:
        if sizes:
            log.warning(
                "%s: ignored without --enable-lora (as vLLM ignores them)",
                ", ".join(flag(a) for a in _LORA_ARGS if _LORA_ARGS[a] in sizes),
            )
        return None
    if base is not None and not enabled:
        return LoraSettings(**{**base, **sizes})
    settings = {field: defaults.get(arg) for arg, field in _LORA_ARGS.items()}
    settings.update(sizes)
    if settings["max_cpu_loras"] is None:  # vLLM: as many as max_loras
        settings["max_cpu_loras"] = settings["max_loras"]
    try:
        return LoraSettings(**{k: v for k, v in settings.items() if v is not None})
    except ValidationError as exc:
        raise ModelsFileError(f"LoRA flags: {exc}") from exc
