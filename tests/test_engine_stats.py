"""The engine's stat logger: vLLM's own Prometheus logger with its ``vllm:*`` series in the
engine's own registry (nothing in the process-global one, where several engines started
in one process would collide and wipe each other's), and the scheduler's counts kept for
the gateway's ``aligngate_engine_*`` gauges."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry

from server.engine.types import EngineStats
from server.engine.vllm_engine import _stat_logger_factory


def _vllm_series(registry: CollectorRegistry) -> set[str]:
    return {
        name
        for names in registry._collector_to_names.values()
        for name in names
        if name.startswith("vllm:")
    }


def test_each_engine_logs_vllms_series_into_its_own_registry(default_model_path: Path) -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.metrics.loggers import PrometheusStatLogger
    from vllm.v1.metrics.stats import SchedulerStats

    config = AsyncEngineArgs(
        model=str(default_model_path), dtype="float32", enforce_eager=True, max_model_len=512
    ).create_engine_config()
    stats = [EngineStats(), EngineStats()]
    registries = [CollectorRegistry(), CollectorRegistry()]
    before = _vllm_series(REGISTRY)
    loggers: list[Any] = []
    for s, r in zip(stats, registries, strict=True):
        factory = _stat_logger_factory(s, r)
        # vLLM adds its own Prometheus logger unless a custom logger is one.
        assert issubclass(factory, PrometheusStatLogger)
        loggers.append(factory(config, engine_indexes=[0]))
    assert _vllm_series(REGISTRY) == before  # the global registry untouched
    # Both engines keep a full set: the second did not unregister the first's.
    assert _vllm_series(registries[0]) == _vllm_series(registries[1])
    assert "vllm:num_requests_running" in _vllm_series(registries[0])

    loggers[1].record(SchedulerStats(num_running_reqs=3, num_waiting_reqs=5), None)
    assert (stats[1].running, stats[1].waiting) == (3, 5)
    assert (stats[0].running, stats[0].waiting) == (0, 0)
    assert (
        registries[1].get_sample_value(
            "vllm:num_requests_running", {"model_name": str(default_model_path), "engine": "0"}
        )
        == 3
    )
    loggers[1].record(None, None)  # an iteration without scheduler stats changes nothing
    assert (stats[1].running, stats[1].waiting) == (3, 5)
