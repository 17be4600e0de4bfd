"""The FastAPI application: services built once in the lifespan and hung on ``app.state``.

Owns: wiring (routers, error handlers, middleware) and the engines' start and stop.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI

from server import __version__
from server.cluster.config import ClusterSettings, shared_store_problem
from server.errors import install_error_handlers
from server.evaluation.judge_runs import JudgeSampler
from server.evaluation.judges import build_judge
from server.guards.admission import Admission
from server.guards.auth import (
    ADMIN_KEY_ID,
    AuthMiddleware,
    KeyRing,
    check_judge_key_ids,
    parse_allowed_hosts,
    parse_keys,
    quotas,
)
from server.guards.draining import Drain, DrainMiddleware
from server.guards.limits import RequestLimitMiddleware
from server.guards.ratelimit import RateLimiter
from server.metrics import GatewayMetrics, RequestMetricsMiddleware
from server.models.models_file import JudgeEntry, ModelEntry, ModelsFileError, Resources
from server.models.registry import Registry
from server.routes import (
    admin,
    arena,
    feedback,
    health,
    openai,
    render,
    stored_completions,
    tokenize,
    ui,
)
from server.routes.deps import storable_params
from server.serving.lenient import IgnoredFieldsHeader
from server.settings import Settings
from server.store import Store
from server.telemetry.request_ids import RequestIdMiddleware
from server.telemetry.tracing import TracingMiddleware, init_tracing, shutdown_tracing
from server.training.online import AlignJobs

log = logging.getLogger(__name__)


def process_started() -> float:
    """When this process started, on ``time.monotonic``'s clock (Linux: /proc; elsewhere:
    now, so the figure reads 0)."""
    try:
        stat = Path("/proc/self/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        return ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.monotonic()


def build_app(
    settings: Settings,
    entries: list[ModelEntry],
    resources: Resources | None = None,
    judges: list[JudgeEntry] | None = None,
    self_url: str | None = None,
    cluster: ClusterSettings | None = None,
) -> FastAPI:
    """``judges``: the models file's; those with ``sample > 0`` judge live traffic in the
    background. ``self_url``: this gateway's …/v1 address (what a judge's ``url: self`` is)."""
    if cluster is not None and (problem := shared_store_problem(settings.store_url())):
        raise ModelsFileError(problem)
    metrics = GatewayMetrics()
    registry = Registry(adapters_root=settings.adapters_dir.resolve())
    if entries:
        registry.prepare(settings, cluster)  # the engine cores' vLLM import starts now
    # Built now, so a missing key variable or prompt file stops `serve` before any engine.
    built = {
        j.name: build_judge(j, self_url=self_url, metrics=metrics.judges) for j in judges or []
    }
    sampling = [judge for judge in built.values() if judge.entry.sample > 0]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = Store.open(
            settings.store_url(),
            on_commit=metrics.store_committed,
            on_error=metrics.store_errors.inc,
        )
        app.state.store = store
        started = time.perf_counter()
        try:
            await registry.start(entries, settings, resources, cluster=cluster)
            for alias, version in registry.aliases.items():
                metrics.promoted(alias, version, None)
        except BaseException:
            registry.shutdown()
            store.close()
            raise
        metrics.watch_engines(
            lambda: [
                (
                    m.name,
                    m.engine.stats.running,
                    m.engine.stats.waiting,
                    m.engine.num_unfinished(),
                )
                for m in registry.all()
            ]
        )
        metrics.watch_vllm(
            lambda: [
                (m.name, m.engine.metrics_registry)
                for m in registry.all()
                if getattr(m.engine, "metrics_registry", None) is not None
            ]
        )
        phases = ", ".join(f"{name} {s:.1f}" for name, s in registry.startup.items())
        log.info(
            "Models ready in %.1f s (%s); %.1f s since the process started",
            time.perf_counter() - started,
            phases,
            time.monotonic() - process_started(),
        )
        sampler = JudgeSampler(store, sampling) if sampling else None
        if sampler is not None:
            sampler.start()
            app.state.completion_listener = sampler.completion_recorded
        try:
            yield
        finally:
            if sampler is not None:  # first: a judge may be this gateway's own engine
                app.state.completion_listener = None
                await sampler.stop()
            await app.state.align_jobs.shutdown()  # kills a training worker still running
            # Engines own processes; stop them here rather than at interpreter exit.
            registry.shutdown()
            store.close()  # commits every queued record first
            shutdown_tracing()  # sends the spans still buffered

    app = FastAPI(
        title="aligngate",
        version=__version__,
        lifespan=lifespan,
        dependencies=[Depends(storable_params)],
    )
    app.state.settings = settings
    app.state.registry = registry
    app.state.judges = built  # by name: the sampler's, the promotion gate's
    app.state.metrics = metrics
    app.state.align_jobs = AlignJobs()
    app.state.admission = Admission()
    user_keys = parse_keys(settings.inline_api_keys(), settings.api_keys_file)
    check_judge_key_ids({j.name: j.stored_key_id for j in judges or []}, user_keys)
    app.state.feedback_limiter = RateLimiter(settings.feedback_per_minute, "feedback requests")
    # The operator's admin key is not limited.
    app.state.request_limiter = RateLimiter(
        settings.requests_per_minute,
        "generation requests",
        per_key={**quotas(user_keys, "requests_per_minute"), ADMIN_KEY_ID: 0},
    )
    app.state.token_limiter = RateLimiter(
        settings.tokens_per_minute,
        "tokens",
        per_key={**quotas(user_keys, "tokens_per_minute"), ADMIN_KEY_ID: 0},
    )
    install_error_handlers(app)
    app.include_router(openai.router)
    app.include_router(stored_completions.router)
    app.include_router(render.router)
    app.include_router(tokenize.router)
    app.include_router(feedback.router)
    app.include_router(arena.router)
    app.include_router(health.router)
    app.include_router(admin.router)
    app.include_router(ui.router)
    app.mount("/ui/static", ui.static_files(), name="ui-static")
    keys = KeyRing(user_keys, settings.admin_key, settings.metrics_key)
    app.add_middleware(
        AuthMiddleware,
        keys=keys,
        metrics_public=settings.metrics_public,
        allowed_hosts=parse_allowed_hosts(settings.allowed_hosts),
    )
    app.add_middleware(RequestLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(IgnoredFieldsHeader)
    app.state.drain = Drain()
    app.add_middleware(DrainMiddleware, drain=app.state.drain)
    # Refused requests are counted too.
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    if init_tracing(settings.otlp_traces_endpoint):
        app.add_middleware(TracingMiddleware)
    # Outermost: every response carries its x-request-id, every log line and record its id.
    app.add_middleware(RequestIdMiddleware)
    return app
