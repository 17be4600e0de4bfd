"""The engine's stat logger: the scheduler's counts for /metrics, and nothing in the
process-global Prometheus registry (several engines start at once in one process)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from prometheus_client import REGISTRY

from server.engine.types import EngineStats
from server.engine.vllm_engine import _stat_logger_factory


def _vllm_series() -> set[str]:
    return {
        name
        for names in REGISTRY._collector_to_names.values()
        for name in names
        if name.startswith("vllm:")
    }


def test_the_sink_replaces_vllms_prometheus_logger_and_keeps_the_global_registry_clean() -> None:
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    stats = EngineStats()
    factory: Any = _stat_logger_factory(stats)
    # vLLM adds its own Prometheus logger unless a custom logger is one.
    assert issubclass(factory, PrometheusStatLogger)
    before = _vllm_series()
    sinks = [factory(vllm_config=None, engine_indexes=[0]) for _ in range(2)]
    assert _vllm_series() == before

    sinks[1].record(SimpleNamespace(num_running_reqs=3, num_waiting_reqs=5), None)
    assert (stats.running, stats.waiting) == (3, 5)
    sinks[0].record(None, None)  # an iteration without scheduler stats changes nothing
    assert (stats.running, stats.waiting) == (3, 5)
    for sink in sinks:
        sink.log()
        sink.log_engine_initialized()
        sink.record_admission_rejection("queue_full")
