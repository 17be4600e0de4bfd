"""The served models: the models file, and each model's renderer and engine at run time.

Owns: the models-file schema (YAML), the embedded default entry, starting and stopping
one engine per model, loading and unloading LoRA adapters (each served under its own name on
its base model's engine, with the base's prompt format), and name → model look-ups.
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

from server.engine.types import AdapterRef
from server.engine.vllm_engine import (
    AdapterLoadError,
    EngineOptions,
    VllmEngine,
    apply_cpu_defaults,
)
from server.errors import Conflict, InvalidRequest, ModelNotFound
from server.models.adapter_files import AdapterFileError, inspect_adapter, resolve_adapter
from server.models.adapter_meta import base_fingerprint
from server.models.default_model import DEFAULT_MODEL_NAME, builtin_model
from server.models.render import FamilyDetectionError, Renderer
from server.settings import Settings

log = logging.getLogger(__name__)

# A models-file path that names the embedded default model instead of a folder.
BUILTIN_DEFAULT = f"builtin:{DEFAULT_MODEL_NAME}"


class ModelsFileError(ValueError):
    """The models file is missing, unreadable or invalid."""


MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"


class LoraSettings(BaseModel):
    """vLLM's LoRA support for one model: what any adapter served on it may be."""

    model_config = ConfigDict(extra="forbid")

    max_rank: Literal[1, 8, 16, 32, 64, 128, 256] = 16
    max_loras: int = Field(default=2, ge=1, le=64)  # adapters in one batch
    max_cpu_loras: int = Field(default=8, ge=1, le=1024)  # adapters kept loaded


class AdapterEntry(BaseModel):
    """A LoRA adapter served from start-up: a folder under the adapters root."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=MODEL_NAME_PATTERN)
    path: str  # relative to the adapters root


class ModelEntry(BaseModel):
    """One served model, as written in the models file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=MODEL_NAME_PATTERN)
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
    # Requests in flight on this model's engine before 429 (default: the setting).
    max_pending_requests: int | None = Field(default=None, ge=1, le=1_000_000)
    # LoRA adapters can be served on this model (at start-up: `adapters`; later: the admin
    # API). Listing adapters turns it on with the defaults.
    lora: LoraSettings | None = None
    adapters: list[AdapterEntry] = Field(default_factory=list)
    engine_args: dict[str, Any] = Field(default_factory=dict)

    @property
    def lora_settings(self) -> LoraSettings | None:
        return self.lora or (LoraSettings() if self.adapters else None)

    @field_validator("engine_args")
    @classmethod
    def _no_shadowing(cls, value: dict[str, Any]) -> dict[str, Any]:
        shadowed = {
            "model",
            "max_model_len",
            "dtype",
            "seed",
            "trust_remote_code",
            "enable_lora",
            "max_lora_rank",
            "max_loras",
            "max_cpu_loras",
        } & set(value)
        if shadowed:
            raise ValueError(f"set {', '.join(sorted(shadowed))} as entry fields, not engine_args")
        return value


class ModelsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelEntry] = Field(min_length=1)

    @field_validator("models")
    @classmethod
    def _unique_names(cls, value: list[ModelEntry]) -> list[ModelEntry]:
        names = [m.name for m in value] + [a.name for m in value for a in m.adapters]
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
        ModelEntry(
            name=DEFAULT_MODEL_NAME,
            path=BUILTIN_DEFAULT,
            max_model_len=8192,
            store=True,
            lora=LoraSettings(),  # so `aligngate align` can hot-load what it trains
        )
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


def lora_engine_args(lora: LoraSettings | None) -> dict[str, Any]:
    if lora is None:
        return {}
    return {
        "enable_lora": True,
        "max_lora_rank": lora.max_rank,
        "max_loras": lora.max_loras,
        "max_cpu_loras": lora.max_cpu_loras,
    }


def check_adapter_fits(parent: ServedModel, meta: dict[str, Any] | None, rank: int) -> None:
    """Refuse an adapter the parent's engine cannot serve, or that was trained on another
    base or prompt family (its metadata says which)."""
    if not parent.engine.lora_enabled:
        raise InvalidRequest(
            f"Model `{parent.name}` is served without LoRA support; set `lora:` in its "
            "models-file entry.",
            param="base",
        )
    if rank > parent.engine.max_lora_rank:
        raise InvalidRequest(
            f"The adapter's rank {rank} exceeds `{parent.name}`'s max LoRA rank "
            f"{parent.engine.max_lora_rank} (`lora.max_rank` in the models file).",
            param="path",
        )
    if meta is None:
        return
    want = (meta.get("base_model") or {}).get("fingerprint")
    if want and want != base_fingerprint(parent.path):
        raise InvalidRequest(
            f"The adapter was trained on a different base model "
            f"({(meta.get('base_model') or {}).get('path')}) than `{parent.name}`.",
            param="base",
        )
    family = meta.get("family")
    if family and family != parent.renderer.family:
        raise InvalidRequest(
            f"The adapter was trained with the {family} prompt format; `{parent.name}` serves "
            f"the {parent.renderer.family} format.",
            param="base",
        )


@dataclass
class ServedModel:
    entry: ModelEntry
    path: str
    renderer: Renderer
    engine: VllmEngine
    created: int = field(default_factory=lambda: int(time.time()))
    # Set on an adapter: the engine runs its requests with this LoRA on the parent model.
    adapter: AdapterRef | None = None
    parent: str | None = None
    adapter_meta: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len


class Registry:
    """Name → running model or adapter."""

    def __init__(self, adapters_root: Path | None = None) -> None:
        self._models: dict[str, ServedModel] = {}
        self._adapters: dict[str, ServedModel] = {}
        self._adapters_root = adapters_root
        self._next_adapter_id = 1
        self._adapter_lock = asyncio.Lock()

    def register(self, model: ServedModel) -> None:
        self._models[model.name] = model

    def get(self, name: str) -> ServedModel:
        model = self._models.get(name) or self._adapters.get(name)
        if model is None:
            raise ModelNotFound(name)
        return model

    def all(self) -> list[ServedModel]:
        """The base models, one engine each."""
        return list(self._models.values())

    def adapters(self) -> list[ServedModel]:
        return list(self._adapters.values())

    def served(self) -> list[ServedModel]:
        return [*self._models.values(), *self._adapters.values()]

    @property
    def adapters_root(self) -> Path:
        if self._adapters_root is None:
            raise InvalidRequest("No adapters root is configured.")
        return self._adapters_root

    def _base_for(self, base: str | None, meta: dict[str, Any] | None) -> ServedModel:
        if base is not None:
            model = self._models.get(base)
            if model is None:
                raise ModelNotFound(base)
            return model
        trained_on = ((meta or {}).get("base_model") or {}).get("name")
        if trained_on in self._models:
            return self._models[trained_on]
        candidates = [m for m in self._models.values() if m.engine.lora_enabled]
        if len(candidates) == 1:
            return candidates[0]
        raise InvalidRequest("Name the base model to serve this adapter on.", param="base")

    async def load_adapter(self, name: str, path: str, base: str | None = None) -> ServedModel:
        """Serve the adapter folder ``path`` (under the adapters root) as model ``name``."""
        try:
            folder = inspect_adapter(resolve_adapter(self.adapters_root, path))
        except AdapterFileError as exc:
            raise InvalidRequest(str(exc), param="path") from exc
        async with self._adapter_lock:
            if name in self._models or name in self._adapters:
                raise Conflict(f"A model named `{name}` is already served.", param="name")
            parent = self._base_for(base, folder.meta)
            check_adapter_fits(parent, folder.meta, folder.rank)
            ref = AdapterRef(name=name, id=self._next_adapter_id, path=str(folder.path))
            try:
                await parent.engine.add_adapter(ref)
            except AdapterLoadError as exc:
                raise InvalidRequest(str(exc), param="path") from exc
            self._next_adapter_id += 1
            served = ServedModel(
                entry=parent.entry.model_copy(update={"name": name, "adapters": []}),
                path=str(folder.path),
                renderer=parent.renderer,
                engine=parent.engine,
                adapter=ref,
                parent=parent.name,
                adapter_meta=folder.meta,
            )
            self._adapters[name] = served
            log.info("Adapter %s (%s) serving on %s", name, folder.path, parent.name)
            return served

    async def unload_adapter(self, name: str) -> ServedModel:
        async with self._adapter_lock:
            served = self._adapters.get(name)
            if served is None or served.adapter is None:
                raise ModelNotFound(name)
            # Requests already running with it finish; vLLM drops it from its cache.
            await served.engine.remove_adapter(served.adapter)
            del self._adapters[name]
            log.info("Adapter %s unloaded", name)
            return served

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
                extra={
                    "trust_remote_code": entry.trust_remote_code,
                    **lora_engine_args(entry.lora_settings),
                    **entry.engine_args,
                },
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
        for entry in entries:
            for adapter in entry.adapters:
                try:
                    await self.load_adapter(adapter.name, adapter.path, base=entry.name)
                except (InvalidRequest, ModelNotFound) as exc:
                    raise ModelsFileError(f"adapter {adapter.name!r}: {exc.message}") from exc

    def shutdown(self) -> None:
        for model in self._models.values():
            try:
                model.engine.shutdown()
            except Exception:  # one failing engine must not keep the others running
                log.exception("Engine %s did not shut down cleanly", model.name)
        self._models.clear()
