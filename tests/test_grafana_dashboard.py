"""deploy/grafana/aligngate.json: every query names a metric the gateway exports on
``/metrics`` (its own ``aligngate_*`` and vLLM's ``vllm:*``), read from the session's
gateway after it served a request."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Gateway

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "aligngate.json"
METRIC = re.compile(r"\b(?:aligngate_|vllm:)[A-Za-z0-9_:]+")
SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")


def _family(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def test_every_dashboard_query_names_an_exported_metric(gateway: Gateway) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    named = {m for expr in exprs for m in METRIC.findall(expr)}
    assert len(named) >= 15, named

    reply = httpx.post(
        f"{gateway.url}/v1/completions",
        json={"model": gateway.model, "prompt": "The sea is", "max_tokens": 2},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    missing = sorted(m for m in named if _family(m) not in families)
    assert not missing, missing
    # A histogram is queried by its buckets, a counter by its _total.
    for name in named:
        kind = families[_family(name)]
        if name.endswith("_bucket"):
            assert kind == "histogram", name
        if name.endswith("_total"):
            assert kind == "counter", name
