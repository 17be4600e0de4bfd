"""A served model's decoding defaults: what a request's left-out sampling fields become.

Precedence, per field: the request, then the models file's `sampling`, then the
checkpoint's ``generation_config.json`` (vLLM's ``--generation-config``: ``auto`` reads the
checkpoint's folder, ``vllm`` reads nothing, a folder reads that folder's), then the
family's default (only where a checkpoint's card prescribes decoding:
``templates/families.yaml``), then OpenAI's neutral values.

The generation config is read as vLLM reads it: transformers' ``GenerationConfig``, the
values that differ from transformers' own defaults, of the fields vLLM takes from it
(``max_new_tokens`` is vLLM's ``max_tokens``).

Owns: reading those sources and merging them, each value with where it came from.
Does not know: requests, engines or HTTP.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The fields vLLM takes from a generation config (``ModelConfig.get_diff_sampling_param``).
GENERATION_CONFIG_FIELDS = (
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "max_new_tokens",
)
DEFAULTABLE = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "max_tokens",
)
MODELS_FILE = "models file"
FAMILY = "family"


class GenerationConfigError(ValueError):
    """A generation config that cannot be read."""


@dataclass(frozen=True, slots=True)
class DecodingDefaults:
    """Each defaulted field's value and its source (``models file``, the generation config
    file's path, or ``family``)."""

    values: Mapping[str, float | int] = field(default_factory=dict)
    sources: Mapping[str, str] = field(default_factory=dict)

    def get(self, name: str) -> Any:
        return self.values.get(name)

    def described(self) -> dict[str, dict[str, Any]]:
        return {k: {"value": v, "from": self.sources[k]} for k, v in self.values.items()}


def generation_config_values(setting: str, checkpoint: Path) -> tuple[dict[str, Any], str]:
    """The sampling values a generation config sets, and the file they came from (``""``
    when none applies). ``setting``: ``auto`` | ``vllm`` | a folder."""
    if setting == "vllm":
        return {}, ""
    folder = checkpoint if setting == "auto" else Path(setting)
    file = folder / "generation_config.json"
    if not file.is_file():
        if setting == "auto":
            return {}, ""  # vLLM: a checkpoint without one sets no sampling defaults
        raise GenerationConfigError(f"generation_config: {file} does not exist")
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(str(folder)).to_diff_dict()
    except (OSError, ValueError) as exc:
        raise GenerationConfigError(f"generation_config: cannot read {file}: {exc}") from exc
    values = {
        ("max_tokens" if k == "max_new_tokens" else k): config[k]
        for k in GENERATION_CONFIG_FIELDS
        if config.get(k) is not None
    }
    return values, str(file)


def resolve(
    models_file: Mapping[str, Any],
    generation_config: Mapping[str, Any],
    generation_config_file: str,
    family: Mapping[str, Any],
) -> DecodingDefaults:
    """Merge the three sources, the models file first."""
    values: dict[str, float | int] = {}
    sources: dict[str, str] = {}
    layers = (
        (models_file, MODELS_FILE),
        (generation_config, generation_config_file),
        (family, FAMILY),
    )
    for name in DEFAULTABLE:
        for layer, source in layers:
            if layer.get(name) is not None:
                values[name], sources[name] = layer[name], source
                break
    return DecodingDefaults(values, sources)
