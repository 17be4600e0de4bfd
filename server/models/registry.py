"""The served models at run time: each model's renderer and engine, started as the
resource plan says, and the LoRA adapters served on them.

Owns: starting and stopping one engine per model (in the plan's order, with its devices and
memory share; with a models file's `cluster:` section, as Ray Serve replicas instead, see
``cluster``), loading and unloading LoRA adapters (each served under its own name on its
base model's engine, with the base's prompt format; on a cluster, the same adapters as the
other front ends, see ``served_list``), and name → model look-ups.
Does not know: HTTP routes or response shapes; the models file's schema (``models_file``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.cluster.config import ClusterSettings, deployment_options
from server.engine import core_process
from server.engine.types import AdapterRef
from server.engine.vllm_engine import AdapterLoadError, EngineOptions, VllmEngine, check_options
from server.errors import Conflict, InvalidRequest, ModelNotFound
from server.models.adapter_files import (
    AdapterFileError,
    adapter_id,
    inspect_adapter,
    resolve_adapter,
)
from server.models.adapter_meta import base_fingerprint
from server.models.aliases import PROMOTIONS_FILE, AliasBook, base_of_alias, latest_alias
from server.models.decoding import DecodingDefaults
from server.models.models_file import (
    LoraSettings,
    ModelEntry,
    ModelsFileError,
    Resources,
    build_renderer,
    decoding_defaults,
    resolve_path,
)
from server.models.planning import PlanningError, plan_entries
from server.models.render import Renderer
from server.models.served_list import ServedList
from server.resources.plan import EnginePlan, Plan
from server.resources.platform import (
    Platform,
    apply_engine_environment,
    detect,
    effective_cpu_kv_cache_gib,
    engine_core_preloaded,
    engine_defaults,
    engine_dtype,
)
from server.settings import Settings

if TYPE_CHECKING:
    from server.cluster.ray_engine import RayCluster, RayEngine

log = logging.getLogger(__name__)


def lora_engine_args(lora: LoraSettings | None) -> dict[str, Any]:
    if lora is None:
        return {}
    return {
        "enable_lora": True,
        "max_lora_rank": lora.max_rank,
        "max_loras": lora.max_loras,
        "max_cpu_loras": lora.max_cpu_loras,
    }


def engine_options(
    entry: ModelEntry,
    path: str,
    placed: EnginePlan | None,
    defaults: dict[str, object],
    platform: Platform | None,
) -> EngineOptions:
    """What vLLM gets for ``entry``: the platform's defaults and dtype, LoRA, the plan's
    memory share and devices (none on a cluster: Ray places replicas), then the models
    file's own `engine_args` (which win). ``platform`` None: a Ray replica applies its own
    node's defaults and dtype (``cluster.replica``)."""
    return EngineOptions(
        model_path=path,
        max_model_len=entry.max_model_len,
        dtype=engine_dtype(entry.dtype, platform) if platform else entry.dtype,
        seed=entry.seed,
        extra={
            **defaults,
            "trust_remote_code": entry.trust_remote_code,
            **lora_engine_args(entry.lora_settings),
            **(placed.engine_args() if placed else {}),
            # On a cluster (no plan: Ray places the replica), the entry's share of its GPU.
            **(
                {"gpu_memory_utilization": entry.gpu_memory_utilization}
                if placed is None and entry.gpu_memory_utilization is not None
                else {}
            ),
            **entry.engine_args,
        },
        environment=placed.environment() if placed else {},
    )


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
    engine: VllmEngine | RayEngine
    created: int = field(default_factory=lambda: int(time.time()))
    # Set on an adapter: the engine runs its requests with this LoRA on the parent model.
    adapter: AdapterRef | None = None
    parent: str | None = None
    adapter_meta: dict[str, Any] | None = None
    # Defaults for the sampling fields a request leaves out (``models.decoding``); an
    # adapter has its parent's.
    decoding: DecodingDefaults = field(default_factory=DecodingDefaults)

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
        self._adapter_lock = asyncio.Lock()
        # The resource plan the engines were started with, and the seconds each phase of
        # ``start`` took.
        self.plan: Plan | None = None
        self.startup: dict[str, float] = {}
        self._platform: Platform | None = None  # ``prepare``'s
        self.aliases = AliasBook(adapters_root / PROMOTIONS_FILE if adapters_root else None)
        self.cluster: RayCluster | None = None
        # On a cluster: the adapters every front end serves (``served_list``).
        self.served_list: ServedList | None = None

    def register(self, model: ServedModel) -> None:
        self._models[model.name] = model

    def get(self, name: str) -> ServedModel:
        """A model, an adapter, or the version an alias (``NAME@latest``) points at."""
        self._sync_adapters()  # on a cluster: one stat, unless another front end changed it
        target = self.aliases.resolve(name) or name
        model = self._models.get(target) or self._adapters.get(target)
        if model is None:
            raise ModelNotFound(name)
        return model

    async def promote(self, alias: str, version: str, *, by: str, reason: str = "") -> str | None:
        """Point ``NAME@latest`` at ``version`` (the base ``NAME`` or one of its adapters);
        returns the version it served before."""
        base = base_of_alias(alias)
        if base is None or base not in self._models:
            raise InvalidRequest(
                f"`{alias}` is not an alias: aliases are `NAME@latest` for a served base model.",
                param="alias",
            )
        async with self._adapter_lock:
            served = self._models.get(version) or self._adapters.get(version)
            if served is None:
                raise ModelNotFound(version)
            if version != base and served.parent != base:
                raise InvalidRequest(
                    f"`{version}` runs on `{served.parent}`, not on `{base}`.", param="version"
                )
            previous = self.aliases.set(alias, version, by=by, reason=reason)
        log.info("Promoted %s: %s -> %s (%s)", alias, previous, version, by)
        return previous

    def all(self) -> list[ServedModel]:
        """The base models, one engine each."""
        return list(self._models.values())

    def adapters(self) -> list[ServedModel]:
        self._sync_adapters()
        return list(self._adapters.values())

    def served(self) -> list[ServedModel]:
        self._sync_adapters()
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
        async with self._adapter_lock:
            self._sync_adapters()
            served = self._prepare_adapter(name, path, base)
            assert served.adapter is not None and served.parent is not None
            try:
                await served.engine.add_adapter(served.adapter)
            except AdapterLoadError as exc:
                raise InvalidRequest(str(exc), param="path") from exc
            # The list first, then this registry, with no await between: a look-up that
            # syncs meanwhile cannot find the list without it and drop it.
            if self.served_list is not None:
                self.served_list.put(name, path, served.parent)
            self._adapters[name] = served
            log.info("Adapter %s (%s) serving on %s", name, served.path, served.parent)
            return served

    def _prepare_adapter(self, name: str, path: str, base: str | None) -> ServedModel:
        """The checked, not yet registered, adapter ``name`` (no engine involved)."""
        try:
            folder = inspect_adapter(resolve_adapter(self.adapters_root, path))
        except AdapterFileError as exc:
            raise InvalidRequest(str(exc), param="path") from exc
        if name in self._models or name in self._adapters:
            raise Conflict(f"A model named `{name}` is already served.", param="name")
        parent = self._base_for(base, folder.meta)
        check_adapter_fits(parent, folder.meta, folder.rank)
        ref = AdapterRef(name=name, id=adapter_id(name, folder.path), path=str(folder.path))
        if any(a.adapter and a.adapter.id == ref.id for a in self._adapters.values()):
            raise Conflict(f"Adapter id {ref.id} is taken; rename `{name}`.", param="name")
        return ServedModel(
            entry=parent.entry.model_copy(update={"name": name, "adapters": []}),
            path=str(folder.path),
            renderer=parent.renderer,
            engine=parent.engine,
            adapter=ref,
            parent=parent.name,
            adapter_meta=folder.meta,
            decoding=parent.decoding,
        )

    def _sync_adapters(self) -> None:
        """On a cluster: serve what the other front ends loaded and stop serving what they
        unloaded (``served_list``), and point the aliases where they promoted; a ``stat``
        each when nothing changed. The replicas load an adapter on its first request, so
        nothing here calls an engine."""
        if self.served_list is not None and self.served_list.changed():
            self._take_up_served_list(self.served_list.read())
        # Then what another front end promoted (after the adapters it names).
        self.aliases.sync(lambda version: version in self._models or version in self._adapters)

    def _take_up_served_list(self, listed: dict[str, dict[str, str]]) -> None:
        for name, item in listed.items():
            if name in self._adapters or name in self._models:
                continue
            try:
                self._adapters[name] = self._prepare_adapter(name, item["path"], item["base"])
                log.info(
                    "Adapter %s serving on %s (loaded by another front end)", name, item["base"]
                )
            except (InvalidRequest, ModelNotFound, Conflict) as exc:
                log.warning("Not serving listed adapter %s: %s", name, exc.message)
        for name in list(self._adapters):
            if name not in listed and not self.aliases.pointing_at(name):
                del self._adapters[name]
                log.info("Adapter %s unloaded by another front end", name)

    async def unload_adapter(self, name: str) -> ServedModel:
        async with self._adapter_lock:
            self._sync_adapters()
            served = self._adapters.get(name)
            if served is None or served.adapter is None:
                raise ModelNotFound(name)
            promoted = self.aliases.pointing_at(name)
            if promoted:
                raise Conflict(
                    f"`{name}` is served as `{promoted[0]}`; promote another version first.",
                    param="name",
                )
            # Requests already running with it finish; vLLM drops it from its cache.
            await served.engine.remove_adapter(served.adapter)
            if self.served_list is not None:
                self.served_list.remove(name)
            del self._adapters[name]
            log.info("Adapter %s unloaded", name)
            return served

    def prepare(
        self,
        settings: Settings,
        cluster: ClusterSettings | None = None,
        platform: Platform | None = None,
        engines: bool = True,
    ) -> None:
        """The platform (detected unless given) and what follows from it before any engine:
        vLLM's environment and, where ``engines`` start here on a CPU, the process their
        cores fork from, importing vLLM from now on. ``serve`` calls it before its app
        starts, so that import overlaps the gateway's own; ``start`` where nobody did."""
        clock = time.perf_counter()
        self._platform = platform or detect()
        apply_engine_environment(self._platform, settings.cpu_kv_cache_gib)
        if (
            engines
            and cluster is None
            and settings.engine_core_preload
            and engine_core_preloaded(self._platform)
        ):
            core_process.preload()
        self.startup["platform"] = time.perf_counter() - clock

    async def start(
        self,
        entries: list[ModelEntry],
        settings: Settings,
        resources: Resources | None = None,
        platform: Platform | None = None,
        cluster: ClusterSettings | None = None,
    ) -> None:
        """Build every renderer, plan the resources (refusing an over-committed plan before
        anything starts), then start the engines in the plan's order: on a CPU side by side
        (each spends most of its start-up in its own work, so they overlap well), on CUDA
        one after another. With ``cluster``, deploy each model's replicas there instead
        (Ray places them; this machine only renders and tokenizes)."""
        clock = time.perf_counter()

        def lap(phase: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            self.startup[phase] = self.startup.get(phase, 0.0) + now - clock
            clock = now

        if platform is not None or self._platform is None:
            await asyncio.to_thread(self.prepare, settings, cluster, platform, bool(entries))
        platform = self._platform
        assert platform is not None
        clock = time.perf_counter()  # ``prepare`` timed the platform
        prepared = {}
        decodings: dict[str, DecodingDefaults] = {}
        for entry in entries:
            path = resolve_path(entry, settings)
            lap("checkpoints")
            renderer = build_renderer(entry, path)
            prepared[entry.name] = (entry, path, renderer)
            decodings[entry.name] = decoding_defaults(entry, path, renderer.spec)
            lap("renderers")
        if cluster is not None:
            await self._start_on_cluster(list(prepared.values()), settings, cluster)
            lap("engines")
        else:
            await self._start_here(prepared, settings, resources, platform, lap)
        for name, decoding in decodings.items():
            self._models[name].decoding = decoding
        self._sync_adapters()  # on a cluster: what its front ends serve already
        for entry in entries:
            for adapter in entry.adapters:
                if adapter.name in self._adapters:
                    continue  # listed by the cluster's front ends
                try:
                    await self.load_adapter(adapter.name, adapter.path, base=entry.name)
                except (InvalidRequest, ModelNotFound) as exc:
                    raise ModelsFileError(f"adapter {adapter.name!r}: {exc.message}") from exc
        await self._restore_aliases()
        lap("adapters")

    async def _start_here(
        self,
        prepared: dict[str, tuple[ModelEntry, str, Renderer]],
        settings: Settings,
        resources: Resources | None,
        platform: Platform,
        lap: Callable[[str], None],
    ) -> None:
        """Every engine in this process, in the resource plan's order."""
        try:
            plan = plan_entries(
                [(entry, Path(path)) for entry, path, _ in prepared.values()],
                resources or Resources(),
                settings,
                platform,
            )
        except PlanningError as exc:
            raise ModelsFileError(str(exc)) from exc
        if not plan.ok:
            raise ModelsFileError("resource plan refused:\n  " + "\n  ".join(plan.problems))
        self.plan = plan
        defaults = engine_defaults(platform)
        if settings.otlp_traces_endpoint:
            # vLLM's own per-request span, a child of the gateway's `engine` span.
            defaults = {**defaults, "otlp_traces_endpoint": settings.otlp_traces_endpoint}
        lap("plan")

        def start_engine(entry: ModelEntry, path: str, placed: EnginePlan) -> VllmEngine:
            started = time.perf_counter()
            options = engine_options(entry, path, placed, defaults, platform)
            engine = VllmEngine.start(entry.name, options)
            log.info("Engine for %s up in %.1f s", entry.name, time.perf_counter() - started)
            return engine

        errors: list[BaseException] = []
        for group in plan.start_groups:
            results = await asyncio.gather(
                *(
                    asyncio.to_thread(start_engine, *prepared[name][:2], plan.engine(name))
                    for name in group
                ),
                return_exceptions=True,
            )
            for name, result in zip(group, results, strict=True):
                entry, path, renderer = prepared[name]
                if isinstance(result, VllmEngine):
                    result.start_output_handler()  # here, on the loop, in no request
                    self.register(
                        ServedModel(entry=entry, path=path, renderer=renderer, engine=result)
                    )
                else:
                    errors.append(result)
            if errors:
                raise errors[0]
        lap("engines")

    async def _start_on_cluster(
        self,
        prepared: list[tuple[ModelEntry, str, Renderer]],
        settings: Settings,
        cluster: ClusterSettings,
    ) -> None:
        """Each model a Ray Serve application of replicas on the cluster (``cluster``);
        the engine arguments are checked here first, where a mistake is quick to report."""
        from server.cluster.ray_engine import RayCluster

        models = []
        for entry, path, _ in prepared:
            options = engine_options(entry, path, None, {}, None)
            check_options(options)
            deployment = deployment_options(
                name=entry.name,
                cluster=cluster,
                replicas=entry.replicas,
                autoscaling=entry.autoscaling,
                num_cpus=entry.num_cpus,
                num_gpus=entry.num_gpus,
                max_ongoing_requests=entry.max_pending_requests or settings.max_pending_requests,
                max_queued_requests=entry.max_queued_requests,
            )
            wanted = entry.autoscaling.min if entry.autoscaling else (entry.replicas or 1)
            models.append((entry.name, options, deployment, wanted))
        if self._adapters_root is not None:
            self.served_list = ServedList(self._adapters_root, cluster.namespace)
        self.cluster = await asyncio.to_thread(RayCluster.connect, cluster)
        kv_cache_gib = effective_cpu_kv_cache_gib(settings.cpu_kv_cache_gib)
        engines = await asyncio.to_thread(self.cluster.deploy, models, kv_cache_gib)
        for (entry, path, renderer), engine in zip(prepared, engines, strict=True):
            self.register(ServedModel(entry=entry, path=path, renderer=renderer, engine=engine))

    async def _restore_aliases(self) -> None:
        """``NAME@latest`` for every base: the version the promotions file names (loading
        an iteration's adapter folder again if needed), else the base itself."""
        saved = self.aliases.saved()
        for base in list(self._models):
            alias = latest_alias(base)
            version = saved.get(alias, base)
            if version != base and version not in self._adapters:
                try:
                    await self.load_adapter(version, version, base=base)
                except (InvalidRequest, ModelNotFound, Conflict) as exc:
                    log.warning(
                        "%s pointed at %s, which cannot be served (%s); serving %s",
                        alias,
                        version,
                        exc.message,
                        base,
                    )
                    version = base
            self.aliases.set(alias, version, by="start")

    def shutdown(self) -> None:
        for model in self._models.values():
            try:
                model.engine.shutdown()
            except Exception:  # one failing engine must not keep the others running
                log.exception("Engine %s did not shut down cleanly", model.name)
        self._models.clear()
        if self.cluster is not None:
            try:
                self.cluster.close()
            except Exception:
                log.exception("Leaving the Ray cluster failed")
            self.cluster = None
