"""Prometheus metrics of the gateway (one registry per app, so tests can run several).

Owns: metric names, labels and the ASGI middleware that counts requests by status.
Does not know: engines' internals (it reads them through callbacks).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6)

# Endpoints are labelled by route template; anything unmatched shares one label so a
# scanner cannot blow up label cardinality.
UNMATCHED = "unmatched"
NO_MODEL = "-"


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "aligngate_requests",
            "HTTP requests by model, endpoint and status.",
            ["model", "endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "aligngate_request_latency_seconds",
            "Time from request received to last byte sent.",
            ["model", "endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "aligngate_time_to_first_token_seconds",
            "Time from request received to the first generated token.",
            ["model", "endpoint"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "aligngate_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "aligngate_completion_tokens", "Completion tokens generated.", ["model"], registry=r
        )
        self.in_flight = Gauge(
            "aligngate_in_flight_requests",
            "Generation requests the gateway is serving now.",
            ["model"],
            registry=r,
        )

        self.rejected = Counter(
            "aligngate_rejected_requests",
            "Requests refused before reaching an engine, by model and reason.",
            ["model", "reason"],
            registry=r,
        )
        # source: "human" (the feedback API, arena votes) or "judge:NAME". An arena vote
        # counts once for each of its two models: preferred / rejected, tie or both_bad.
        self.feedback = Counter(
            "aligngate_feedback",
            "Feedback received, by model, source and label.",
            ["model", "source", "label"],
            registry=r,
        )
        self.arena_battles = Counter(
            "aligngate_arena_battles",
            "Arena battles started (two answers served blind), by source.",
            ["source"],
            registry=r,
        )
        self.arena_votes = Counter(
            "aligngate_arena_votes",
            "Battle outcomes recorded, by source and winner (a, b, tie, both_bad).",
            ["source", "winner"],
            registry=r,
        )
        self.store_write_latency = Histogram(
            "aligngate_store_commit_seconds",
            "Time of one group commit to the store.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.promoted_version = Gauge(
            "aligngate_promoted_version",
            "1 for the version each alias (NAME@latest) serves now.",
            ["alias", "version"],
            registry=r,
        )
        self.gate_win_rate = Gauge(
            "aligngate_gate_win_rate",
            "The candidate's win rate at the last promotion gate of each base model.",
            ["model"],
            registry=r,
        )
        # Per replica of a model's engine (Ray backend): what this gateway sent each one,
        # how those ended, and the replica's scheduler queue as its last reply reported it.
        self.replica_requests = Counter(
            "aligngate_replica_requests",
            "Engine requests by model, replica and outcome (ok, error, cancelled).",
            ["model", "replica", "outcome"],
            registry=r,
        )
        self.replica_in_flight = Gauge(
            "aligngate_replica_in_flight_requests",
            "Engine requests this gateway has running on each replica now.",
            ["model", "replica"],
            registry=r,
        )
        self.replica_engine_requests = Gauge(
            "aligngate_replica_engine_requests",
            "Each replica's engine (running, waiting, unfinished) as its last reply found it.",
            ["model", "replica", "state"],
            registry=r,
        )
        self.store_writes = Counter(
            "aligngate_store_writes", "Writes committed to the store.", registry=r
        )
        self.store_errors = Counter(
            "aligngate_store_errors", "Store writes or reads that failed.", registry=r
        )
        self.judges = JudgeMetrics(r)
        # A judge's stored verdicts count as feedback too, under source ``judge:<name>``.
        self.judges.feedback = self.feedback

    def promoted(self, alias: str, version: str, previous: str | None) -> None:
        """One series per alias: the version it serves now."""
        if previous is not None and previous != version:
            with contextlib.suppress(KeyError):
                self.promoted_version.remove(alias, previous)
        self.promoted_version.labels(alias, version).set(1)

    def promotions(self, current: list[tuple[str, str]]) -> None:
        """Every alias's series as ``current`` says (promotions made by other front ends of
        a cluster included)."""
        self.promoted_version.clear()
        for alias, version in current:
            self.promoted_version.labels(alias, version).set(1)

    def replica_started(self, model: str, replica: str, queue: dict[str, int]) -> None:
        """A request went to ``replica``, whose engine reported ``queue`` (running,
        waiting, unfinished) as it took it."""
        self.replica_in_flight.labels(model, replica).inc()
        for state, count in queue.items():
            self.replica_engine_requests.labels(model, replica, state).set(count)

    def replica_finished(self, model: str, replica: str, outcome: str) -> None:
        self.replica_in_flight.labels(model, replica).dec()
        self.replica_requests.labels(model, replica, outcome).inc()

    def store_committed(self, seconds: float, writes: int) -> None:
        self.store_write_latency.observe(seconds)
        self.store_writes.inc(writes)

    def watch_engines(self, read: Callable[[], list[tuple[str, int, int, int]]]) -> None:
        """Expose per-model engine gauges read at scrape time: (model, running, waiting,
        unfinished) where unfinished counts requests the engine still tracks."""
        self.registry.register(_EngineCollector(read))

    def watch_vllm(self, read: Callable[[], list[tuple[str, CollectorRegistry]]]) -> None:
        """Expose vLLM's own ``vllm:*`` series of every local engine, read at scrape time
        from each engine's registry: (model, registry)."""
        self.registry.register(VllmMetricsCollector(read))


_JUDGE_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256)


class JudgeMetrics:
    """AI judges' calls: requests (every HTTP attempt), their latency, errors by reason
    (``unparseable`` replies among them: never stored as verdicts), verdicts stored, and
    sampled completions dropped because a judge's queue was full."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry or CollectorRegistry(auto_describe=True)
        # The gateway's aligngate_feedback_total{model,source,label}, when there is one.
        self.feedback: Counter | None = None
        self.requests = Counter(
            "aligngate_judge_requests",
            "Requests sent to AI judges (each attempt), by judge and kind.",
            ["judge", "kind"],
            registry=r,
        )
        self.latency = Histogram(
            "aligngate_judge_latency_seconds",
            "Time of one answered judge request.",
            ["judge"],
            buckets=_JUDGE_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "aligngate_judge_errors",
            "Judge calls without a verdict, by judge and reason (no_marker, ambiguous, "
            "out_of_range, empty_judgment: the reply was unparseable; http_NNN, timeout, "
            "connection, bad_response: the endpoint failed).",
            ["judge", "reason"],
            registry=r,
        )
        self.verdicts = Counter(
            "aligngate_judge_verdicts",
            "Verdicts stored, by judge and verdict (desirable, undesirable, a, b, tie).",
            ["judge", "verdict"],
            registry=r,
        )
        self.dropped = Counter(
            "aligngate_judge_dropped",
            "Sampled completions not judged because the judge's queue was full.",
            ["judge"],
            registry=r,
        )

    def observe_request(self, judge: str, kind: str, seconds: float | None) -> None:
        self.requests.labels(judge=judge, kind=kind).inc()
        if seconds is not None:
            self.latency.labels(judge=judge).observe(seconds)


class _EngineCollector(Collector):
    def __init__(self, read: Callable[[], list[tuple[str, int, int, int]]]):
        self._read = read

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        running = GaugeMetricFamily(
            "aligngate_engine_running_requests",
            "Requests the engine scheduler is running.",
            labels=["model"],
        )
        waiting = GaugeMetricFamily(
            "aligngate_engine_waiting_requests",
            "Requests waiting in the engine scheduler.",
            labels=["model"],
        )
        unfinished = GaugeMetricFamily(
            "aligngate_engine_unfinished_requests",
            "Requests the engine has accepted and not yet finished or aborted.",
            labels=["model"],
        )
        for model, run, wait, unfin in self._read():
            running.add_metric([model], run)
            waiting.add_metric([model], wait)
            unfinished.add_metric([model], unfin)
        yield from (running, waiting, unfinished)


class VllmMetricsCollector(Collector):
    """vLLM's own series of several engines as one set of metric families.

    Each engine keeps its ``vllm:*`` series in a registry of its own (``engine.vllm_engine``);
    the text format allows each family once, so the families are merged here. Every sample
    carries its model as vLLM's ``model_name`` label (added where vLLM leaves it out, as on
    ``vllm:cache_config_info``), so two engines' samples never collide.
    """

    def __init__(self, read: Callable[[], list[tuple[str, CollectorRegistry]]]):
        self._read = read

    def collect(self) -> Any:
        from prometheus_client.metrics_core import Metric

        families: dict[str, Metric] = {}
        for model, registry in self._read():
            for family in registry.collect():
                merged = families.get(family.name)
                if merged is None:
                    merged = Metric(family.name, family.documentation, family.type, family.unit)
                    families[family.name] = merged
                for sample in family.samples:
                    if "model_name" not in sample.labels:
                        sample = sample._replace(labels={**sample.labels, "model_name": model})
                    merged.samples.append(sample)
        yield from families.values()


class RequestMetricsMiddleware:
    """Counts every HTTP request by status and times it to its last byte (streams too).

    The route handler names the model by setting ``request.state.model``.
    """

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        scope.setdefault("state", {})["received_at"] = started
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            # However the request ended (a client gone before its stream started included),
            # its in-flight gauge and its engine slot are given back.
            tracker = scope.get("state", {}).get("tracker")
            if tracker is not None:
                tracker.close()
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or UNMATCHED
            model = scope.get("state", {}).get("model", NO_MODEL)
            self.metrics.requests.labels(model, endpoint, str(status)).inc()
            if endpoint.startswith("/v1/") and model != NO_MODEL:
                self.metrics.latency.labels(model, endpoint).observe(time.perf_counter() - started)
