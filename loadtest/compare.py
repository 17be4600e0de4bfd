"""Side-by-side: raw vLLM's OpenAI server and the gateway, same model, same engine settings,
one after the other on this machine, the identical workload against each, then the ratios."""

from __future__ import annotations

import asyncio
import datetime as dt
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest import report
from loadtest.client import Target
from loadtest.runner import Load, run_load
from loadtest.servers import (
    RunningServer,
    ServerSpec,
    engine_env,
    gateway,
    raw_vllm,
    write_models_file,
)
from loadtest.stats import Slo, percentile
from loadtest.workload import Item, fixed_length, request_stream


@dataclass(frozen=True, slots=True)
class CompareConfig:
    model_path: Path
    served_name: str
    items: Sequence[Item]
    concurrency: Sequence[int]
    requests_per_level: Mapping[int, int]
    out_dir: Path
    endpoint: str = "chat"
    max_model_len: int = 2048
    kv_cache_gib: int = 2
    extra_env: Mapping[str, str] = field(default_factory=dict)
    overhead_requests: int = 100
    seed: int = 0
    slo: Slo | None = None
    servers: Sequence[str] = ("raw-vllm", "aligngate")
    gateway_command: Sequence[str] | None = None


def default_model_path() -> Path:
    """The gateway's embedded default model, converted once (its own CLI prints the folder)."""
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "default-model"],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def _specs(config: CompareConfig) -> list[ServerSpec]:
    env = engine_env(config.kv_cache_gib, config.extra_env)
    specs = []
    for name in config.servers:
        if name == "raw-vllm":
            specs.append(raw_vllm(config.model_path, config.served_name, config.max_model_len, env))
        elif name == "aligngate":
            models = write_models_file(
                config.out_dir / "models.yaml",
                config.served_name,
                config.model_path,
                config.max_model_len,
            )
            specs.append(gateway(models, env, config.gateway_command))
        else:
            raise ValueError(f"unknown server {name!r} (raw-vllm, aligngate)")
    return specs


async def _measure(config: CompareConfig, spec: ServerSpec) -> dict[str, Any]:
    target = Target(spec.base_url, config.served_name, endpoint=config.endpoint)  # type: ignore[arg-type]
    probe = await run_load(
        target,
        request_stream(fixed_length(config.items, 1), config.seed),
        Load(concurrency=1, num_requests=config.overhead_requests),
        warmup=3,
    )
    levels = []
    for c in config.concurrency:
        load = Load(concurrency=c, num_requests=config.requests_per_level[c])
        result = await run_load(target, request_stream(config.items, config.seed), load, warmup=2)
        summary = result.summary(config.slo)
        print(f"  {spec.label} {load.label}: {summary['output_throughput']:.1f} tok/s, "
              f"TTFT p50 {summary['ttft_ms']['p50']:.0f} ms, errors {summary['errors']}",
              flush=True)  # fmt: skip
        levels.append(summary)
    return {"overhead_probe": probe.summary(), "levels": levels}


def _overhead(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Gateway minus raw end-to-end latency of 1-token requests, at the median and p99."""
    gw = results["aligngate"]["overhead_probe"]["e2e_ms"]
    raw = results["raw-vllm"]["overhead_probe"]["e2e_ms"]
    return {
        "aligngate_e2e_ms": {k: gw[k] for k in ("p50", "p99")},
        "raw_vllm_e2e_ms": {k: raw[k] for k in ("p50", "p99")},
        "overhead_ms": {k: gw[k] - raw[k] for k in ("p50", "p99")},
    }


def run_compare(config: CompareConfig) -> dict[str, Any]:
    config.out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    for spec in _specs(config):
        print(f"starting {spec.label} on {spec.base_url}", flush=True)
        with RunningServer(spec, config.out_dir / f"{spec.label}.log") as server:
            start_s = server.wait_ready(config.served_name)
            print(f"  ready in {start_s:.1f} s", flush=True)
            measured = asyncio.run(_measure(config, spec))
            results[spec.label] = {"start_s": start_s, **measured}
    payload: dict[str, Any] = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "cpus": _cpu_count()},
        "model": str(config.model_path),
        "endpoint": config.endpoint,
        "workload": {
            "items": len(config.items),
            "mean_max_tokens": sum(i.max_tokens for i in config.items) / len(config.items),
            "p50_max_tokens": percentile([i.max_tokens for i in config.items], 50),
        },
        "engine_env": engine_env(config.kv_cache_gib, config.extra_env),
        "servers": results,
    }
    if {"raw-vllm", "aligngate"} <= results.keys():
        payload["ratios"] = report.ratios(
            results["aligngate"]["levels"], results["raw-vllm"]["levels"]
        )
        payload["overhead"] = _overhead(results)
    report.write_json(config.out_dir / "results.json", payload)
    runs = {label: r["levels"] for label, r in results.items()}
    report.plot(runs, config.out_dir)
    (config.out_dir / "results.md").write_text(markdown(payload), encoding="utf-8")
    return payload


def markdown(payload: Mapping[str, Any]) -> str:
    servers = payload["servers"]
    parts = [report.results_table({label: r["levels"] for label, r in servers.items()})]
    if "ratios" in payload:
        parts.append(report.ratio_table(payload["ratios"], "aligngate", "raw-vllm"))
        o = payload["overhead"]
        rows = (
            ("raw-vllm", o["raw_vllm_e2e_ms"], ".1f"),
            ("aligngate", o["aligngate_e2e_ms"], ".1f"),
            ("overhead", o["overhead_ms"], "+.1f"),
        )
        parts.append(
            "Per-request overhead (1-token requests, concurrency 1, end-to-end):\n\n"
            "| | p50 ms | p99 ms |\n|---|---|---|\n"
            + "\n".join(f"| {name} | {v['p50']:{f}} | {v['p99']:{f}} |" for name, v, f in rows)
        )
    starts = ", ".join(f"{label} {r['start_s']:.1f} s" for label, r in servers.items())
    parts.append(f"Start to ready: {starts}.")
    return "\n\n".join(parts) + "\n"


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0))
