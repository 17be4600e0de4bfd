"""The served models: the models file, and each model's renderer and engine at run time.

Owns: the models-file schema (YAML), the embedded default entry, starting and stopping
one engine per model, and name → model look-ups.
Does not know: HTTP routes or response shapes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from server.default_model import DEFAULT_MODEL_NAME, builtin_model
from server.engine.vllm_engine import EngineOptions, VllmEngine, apply_cpu_defaults
from server.errors import ModelNotFound
from server.render import FamilyDetectionError, Renderer
from server.settings import Settings

log = logging.getLogger(__name__)

# A models-file path that names the embedded default model instead of a folder.
BUILTIN_DEFAULT = f"builtin:{DEFAULT_MODEL_NAME}"


class ModelsFileError(ValueError):
    """The models file is missing, unreadable or invalid."""


class ModelEntry(BaseModel):
    """One served model, as written in the models file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
    path: str
    # The prompt format (templates/families.yaml); detected from the checkpoint if omitted.
    family: Literal["cut", "kto", "dpo", "quark", "chat"] | None = None
    # A Jinja file replacing the family's template (a file in templates/ or a path).
    template: str | None = None
    # Quark: reward-quantile prefixes, best first (default: the 5 _QUANTILE_TOKEN_k_).
    quantile_tokens: list[str] | None = Field(default=None, min_length=1)
    default_quantile: int | None = Field(default=None, ge=0)
    max_model_len: int | None = Field(default=None, ge=16)
    dtype: str = "auto"
    seed: int = 0
    trust_remote_code: bool = False
    # Record this model's completions in the store (a request's `store` field overrides).
    store: bool = False
    engine_args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("engine_args")
    @classmethod
    def _no_shadowing(cls, value: dict[str, Any]) -> dict[str, Any]:
        shadowed = {"model", "max_model_len", "dtype", "seed", "trust_remote_code"} & set(value)
        if shadowed:
            raise ValueError(f"set {', '.join(sorted(shadowed))} as entry fields, not engine_args")
        return value


class ModelsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelEntry] = Field(min_length=1)

    @field_validator("models")
    @classmethod
    def _unique_names(cls, value: list[ModelEntry]) -> list[ModelEntry]:
        names = [m.name for m in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate model name(s): {', '.join(dupes)}")
        return value


def load_models_file(path: Path) -> list[ModelEntry]:
    """Parse a models file; relative paths (checkpoints, templates) resolve against its folder."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ModelsFileError(f"cannot read models file {path}: {exc}") from exc
    try:
        parsed = ModelsFile.model_validate(raw)
    except ValidationError as exc:
        raise ModelsFileError(f"invalid models file {path}:\n{exc}") from exc
    base = path.resolve().parent
    entries = []
    for entry in parsed.models:
        update: dict[str, str] = {}
        if not entry.path.startswith("builtin:") and not Path(entry.path).is_absolute():
            update["path"] = str(base / entry.path)
        if entry.template and (base / entry.template).is_file():
            update["template"] = str(base / entry.template)
        entries.append(entry.model_copy(update=update) if update else entry)
    return entries


def default_entries() -> list[ModelEntry]:
    return [
        ModelEntry(name=DEFAULT_MODEL_NAME, path=BUILTIN_DEFAULT, max_model_len=8192, store=True)
    ]


def resolve_path(entry: ModelEntry, settings: Settings) -> str:
    if entry.path.startswith("builtin:"):
        try:
            return str(builtin_model(entry.path.removeprefix("builtin:"), settings.models_dir))
        except KeyError as exc:
            raise ModelsFileError(f"model {entry.name!r}: {exc.args[0]}") from exc
    if not Path(entry.path).is_dir():
        raise ModelsFileError(f"model {entry.name!r}: {entry.path} is not a folder")
    return entry.path


def build_renderer(entry: ModelEntry, path: str) -> Renderer:
    try:
        return Renderer.load(
            path,
            family_name=entry.family,
            template=entry.template,
            trust_remote_code=entry.trust_remote_code,
            quantile_tokens=entry.quantile_tokens,
            default_quantile=entry.default_quantile,
        )
    except (FamilyDetectionError, FileNotFoundError) as exc:
        raise ModelsFileError(f"model {entry.name!r}: {exc}") from exc


@dataclass
class ServedModel:
    entry: ModelEntry
    path: str
    renderer: Renderer
    engine: VllmEngine
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len


class Registry:
    """Name → running model."""

    def __init__(self) -> None:
        self._models: dict[str, ServedModel] = {}

    def register(self, model: ServedModel) -> None:
        self._models[model.name] = model

    def get(self, name: str) -> ServedModel:
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(name)
        return model

    def all(self) -> list[ServedModel]:
        return list(self._models.values())

    async def start(self, entries: list[ModelEntry], settings: Settings) -> None:
        """Build every renderer, then start the engines side by side: each spends most of
        its start-up in its own engine-core process, so they overlap well."""
        apply_cpu_defaults(settings.cpu_kv_cache_gib)
        prepared = []
        for entry in entries:
            path = resolve_path(entry, settings)
            prepared.append((entry, path, build_renderer(entry, path)))

        def start_engine(entry: ModelEntry, path: str) -> VllmEngine:
            started = time.perf_counter()
            options = EngineOptions(
                model_path=path,
                max_model_len=entry.max_model_len,
                dtype=entry.dtype,
                seed=entry.seed,
                extra={"trust_remote_code": entry.trust_remote_code, **entry.engine_args},
            )
            engine = VllmEngine.start(entry.name, options)
            log.info("Engine for %s up in %.1f s", entry.name, time.perf_counter() - started)
            return engine

        results = await asyncio.gather(
            *(asyncio.to_thread(start_engine, entry, path) for entry, path, _ in prepared),
            return_exceptions=True,
        )
        for (entry, path, renderer), result in zip(prepared, results, strict=True):
            if isinstance(result, VllmEngine):
                self.register(ServedModel(entry=entry, path=path, renderer=renderer, engine=result))
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    def shutdown(self) -> None:
        for model in self._models.values():
            try:
                model.engine.shutdown()
            except Exception:  # one failing engine must not keep the others running
                log.exception("Engine %s did not shut down cleanly", model.name)
        self._models.clear()
