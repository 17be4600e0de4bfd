"""vLLM's own ``vllm:*`` metrics on the gateway's ``/metrics`` (issue 33, item 5), beside
``aligngate_*``, labelled by model (vLLM's ``model_name``), several engines in one process.

The names are read from the installed vLLM: its own ``PrometheusStatLogger``, built here
for the gateway's engine configuration, registers them; each must be on ``/metrics``."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtest.servers import DEFAULT_LORA_FLAGS, DEFAULT_MAX_MODEL_LEN
from tests.conftest import Gateway


@pytest.fixture(scope="module")
def vllm_metric_names(default_model_path: Path) -> set[str]:
    """What vLLM's Prometheus logger registers for the README's default engine (LoRA on)."""
    from prometheus_client import REGISTRY
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.metrics.loggers import PrometheusStatLogger
    from vllm.v1.metrics.prometheus import unregister_vllm_metrics

    lora = dict(zip(DEFAULT_LORA_FLAGS[1::2], DEFAULT_LORA_FLAGS[2::2], strict=True))
    config = AsyncEngineArgs(
        model=str(default_model_path),
        dtype="float32",
        enforce_eager=True,
        max_model_len=DEFAULT_MAX_MODEL_LEN,
        enable_lora=True,
        max_lora_rank=int(lora["--max-lora-rank"]),
    ).create_engine_config()
    PrometheusStatLogger(config)  # vLLM's own, into the process-global registry
    names = {m.name for m in REGISTRY.collect() if m.name.startswith("vllm:")}
    unregister_vllm_metrics()
    assert len(names) >= 30, names
    return names


def _scrape(gateway: Gateway) -> dict[str, object]:
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_every_vllm_metric_is_on_metrics_labelled_by_model(
    gateway: Gateway, vllm_metric_names: set[str]
) -> None:
    reply = httpx.post(
        f"{gateway.url}/v1/completions",
        json={"model": gateway.model, "prompt": "The sea is", "max_tokens": 4},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    families = _scrape(gateway)
    missing = sorted(vllm_metric_names - set(families))
    assert not missing, missing
    assert "aligngate_requests" in families  # beside the gateway's own
    for name in vllm_metric_names:
        models = {s.labels.get("model_name") for s in families[name].samples}  # type: ignore[attr-defined]
        assert models <= {gateway.model}, (name, models)
    # The engine counted the request it served.
    tokens = families["vllm:generation_tokens"].samples  # type: ignore[attr-defined]
    assert sum(s.value for s in tokens if s.name.endswith("_total")) >= 4
    ttft = families["vllm:time_to_first_token_seconds"].samples  # type: ignore[attr-defined]
    assert any(s.name.endswith("_count") and s.value >= 1 for s in ttft)
