"""Side-by-side: raw vLLM's OpenAI server and the gateway, same model, same engine settings,
one after the other on this machine, the identical workload against each, then the ratios."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import platform
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest import report
from loadtest.client import Target
from loadtest.ray_head import RayHead, ray_head
from loadtest.runner import Load, RunResult, run_load
from loadtest.servers import (
    DEFAULT_LORA_FLAGS,
    DEFAULT_MAX_MODEL_LEN,
    RunningServer,
    ServerSpec,
    engine_env,
    free_port,
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
    rounds: int = 1
    gateway_command: Sequence[str] | None = None
    # strict: the gateway from a models file without LoRA or storing, raw vLLM alike;
    # default: `aligngate serve` as users run it (LoRA on, storing on, 8,192 tokens) and raw
    # vLLM with the same LoRA and length settings.
    setup: str = "strict"
    ray_replicas: int = 1  # the `aligngate-ray` row's replicas


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
    if config.setup not in ("strict", "default"):
        raise ValueError(f"unknown setup {config.setup!r} (strict, default)")
    if "aligngate-ray" in config.servers and config.setup != "strict":
        raise ValueError("aligngate-ray runs the strict setup only")
    specs = []
    for name in config.servers:
        if name == "raw-vllm" and config.setup == "default":
            specs.append(
                raw_vllm(config.model_path, config.served_name, DEFAULT_MAX_MODEL_LEN, env,
                         DEFAULT_LORA_FLAGS)
            )  # fmt: skip
        elif name == "raw-vllm":
            specs.append(raw_vllm(config.model_path, config.served_name, config.max_model_len, env))
        elif name == "aligngate" and config.setup == "default":
            # Storing stays on, into a scratch database beside the results.
            store = {"ALIGNGATE_DATABASE_URL": f"sqlite:///{config.out_dir.resolve()}/store.db"}
            specs.append(gateway(None, {**env, **store}, config.gateway_command))
        elif name == "aligngate-ray":
            # The strict gateway's models file plus `cluster:` (written once the run's Ray
            # head is up and its address known, see ``_ray_cluster``).
            models = config.out_dir / "models-ray.yaml"
            spec = gateway(models, env, config.gateway_command)
            specs.append(dataclasses.replace(spec, label="aligngate-ray"))
        elif name == "aligngate":
            models = write_models_file(
                config.out_dir / "models.yaml",
                config.served_name,
                config.model_path,
                config.max_model_len,
            )
            specs.append(gateway(models, env, config.gateway_command))
        else:
            raise ValueError(f"unknown server {name!r} (raw-vllm, aligngate, aligngate-ray)")
    return specs


@dataclass(slots=True)
class Measured:
    """One server's raw results across rounds: per-request data and CPU seconds, pooled."""

    start_s: list[float] = field(default_factory=list)
    probe: list[RunResult] = field(default_factory=list)
    probe_cpu: list[dict[str, float]] = field(default_factory=list)
    levels: dict[int, list[RunResult]] = field(default_factory=dict)
    level_cpu: dict[int, list[dict[str, float]]] = field(default_factory=dict)


def _cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in before}


def _pooled(runs: list[RunResult], cpus: list[dict[str, float]], slo: Slo | None) -> dict[str, Any]:
    """One summary over every round: requests pooled, durations and CPU seconds summed."""
    first = runs[0]
    pooled = RunResult(
        first.load,
        sum(r.duration_s for r in runs),
        [x for r in runs for x in r.results],
    )
    summary = pooled.summary(slo)
    summary["rounds"] = len(runs)
    front = sum(c["front_end"] for c in cpus)
    summary["cpu"] = {
        "front_end_s": front,
        "engine_s": sum(c["engine"] for c in cpus),
        "front_end_ms_per_request": 1000 * front / max(int(summary["completed"]), 1),
        "front_end_ms_per_1k_tokens": 1e6 * front / max(int(summary["output_tokens"]), 1),
    }
    return summary


async def _measure_once(
    config: CompareConfig, spec: ServerSpec, server: RunningServer, into: Measured
) -> None:
    """The overhead probe, then each concurrency level; CPU time is read around the timed
    part only (warm-up excluded)."""
    target = Target(spec.base_url, config.served_name, endpoint=config.endpoint)  # type: ignore[arg-type]
    cpu: dict[str, float] = {}

    def mark() -> None:
        cpu.update(server.cpu_seconds())

    probe = await run_load(
        target,
        request_stream(fixed_length(config.items, 1), config.seed),
        Load(concurrency=1, num_requests=config.overhead_requests),
        warmup=3,
        on_start=mark,
    )
    into.probe.append(probe)
    into.probe_cpu.append(_cpu_delta(cpu, server.cpu_seconds()))
    for c in config.concurrency:
        load = Load(concurrency=c, num_requests=config.requests_per_level[c])
        items = request_stream(config.items, config.seed)
        result = await run_load(target, items, load, warmup=2, on_start=mark)
        into.levels.setdefault(c, []).append(result)
        into.level_cpu.setdefault(c, []).append(_cpu_delta(cpu, server.cpu_seconds()))
        summary = result.summary()
        print(f"  {spec.label} {load.label}: {summary['output_throughput']:.1f} tok/s, "
              f"TTFT p50 {summary['ttft_ms']['p50']:.0f} ms, errors {summary['errors']}",
              flush=True)  # fmt: skip


def _overhead(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Gateway minus raw end-to-end latency of 1-token requests, at the median and p99."""
    gw = results["aligngate"]["overhead_probe"]["e2e_ms"]
    raw = results["raw-vllm"]["overhead_probe"]["e2e_ms"]
    return {
        "aligngate_e2e_ms": {k: gw[k] for k in ("p50", "p99")},
        "raw_vllm_e2e_ms": {k: raw[k] for k in ("p50", "p99")},
        "overhead_ms": {k: gw[k] - raw[k] for k in ("p50", "p99")},
    }


def replica_cpus(machine_cpus: int, replicas: int) -> int:
    """Each Ray replica's CPUs: the machine's cores shared out, as the local engine has them
    all. On a CPU node they are also its engine's threads: Ray sets an actor's
    `OMP_NUM_THREADS` to its CPUs, so one CPU each (the models file's default) would run
    the engine on one thread against the local row's two."""
    return max(1, machine_cpus // max(replicas, 1))


@contextlib.contextmanager
def _ray_cluster(
    config: CompareConfig, spec: ServerSpec, round_: int
) -> Iterator[tuple[RayHead, str]]:
    """A Ray head for the `aligngate-ray` row (started with the engine environment, which
    its replicas inherit), that row's models file naming it, and a throwaway PostgreSQL
    database for its store (a cluster's gateway refuses SQLite): the head and its URL."""
    from tests.postgres import create_database, postgres_server

    log = config.out_dir / f"ray-head-{round_ + 1}.log"
    with ray_head(spec.env, log) as head, postgres_server(free_port()) as admin_url:
        write_models_file(
            config.out_dir / "models-ray.yaml",
            config.served_name,
            config.model_path,
            config.max_model_len,
            cluster={"backend": "ray", "address": head.address, "namespace": "aligngate-bench"},
            replicas=config.ray_replicas,
            replica_cpus=replica_cpus(_cpu_count(), config.ray_replicas),
        )
        yield head, create_database(admin_url)


def run_compare(config: CompareConfig) -> dict[str, Any]:
    """Rounds alternate the order (A B, B A, …) so drift of the machine between the first and
    the second server cancels out; every summary pools all rounds."""
    config.out_dir.mkdir(parents=True, exist_ok=True)
    specs = _specs(config)
    measured = {spec.label: Measured() for spec in specs}
    for round_ in range(config.rounds):
        for spec in specs if round_ % 2 == 0 else list(reversed(specs)):
            print(f"round {round_ + 1}: starting {spec.label} on {spec.base_url}", flush=True)
            log = config.out_dir / f"{spec.label}-{round_ + 1}.log"
            with contextlib.ExitStack() as stack:
                engine_pids = None
                running = spec
                if spec.label == "aligngate-ray":
                    head, store_url = stack.enter_context(_ray_cluster(config, spec, round_))
                    engine_pids = head.pids
                    running = dataclasses.replace(
                        spec, env={**spec.env, "ALIGNGATE_DATABASE_URL": store_url}
                    )
                server = stack.enter_context(RunningServer(running, log, engine_pids))
                start_s = server.wait_ready(config.served_name)
                print(f"  ready in {start_s:.1f} s", flush=True)
                measured[spec.label].start_s.append(start_s)
                asyncio.run(_measure_once(config, spec, server, measured[spec.label]))
    results: dict[str, dict[str, Any]] = {
        label: {
            "start_s": m.start_s,
            "overhead_probe": _pooled(m.probe, m.probe_cpu, None),
            "levels": [
                _pooled(m.levels[c], m.level_cpu[c], config.slo) for c in config.concurrency
            ],
        }
        for label, m in measured.items()
    }
    payload: dict[str, Any] = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "cpus": _cpu_count()},
        "model": str(config.model_path),
        "endpoint": config.endpoint,
        "rounds": config.rounds,
        "setup": config.setup,
        "workload": {
            "items": len(config.items),
            "mean_max_tokens": sum(i.max_tokens for i in config.items) / len(config.items),
            "p50_max_tokens": percentile([i.max_tokens for i in config.items], 50),
            "requests_per_level_per_round": {
                str(c): n for c, n in config.requests_per_level.items()
            },
        },
        "engine_env": engine_env(config.kv_cache_gib, config.extra_env),
        "servers": results,
    }
    if {"raw-vllm", "aligngate"} <= results.keys():
        payload["ratios"] = report.ratios(
            results["aligngate"]["levels"], results["raw-vllm"]["levels"]
        )
        payload["overhead"] = _overhead(results)
    if {"aligngate", "aligngate-ray"} <= results.keys():
        # The cost of the Ray hop: the Ray backend against the same gateway serving locally.
        payload["ray_ratios"] = report.ratios(
            results["aligngate-ray"]["levels"], results["aligngate"]["levels"]
        )
        payload["ray_overhead"] = {
            k: results["aligngate-ray"]["overhead_probe"]["e2e_ms"][k]
            - results["aligngate"]["overhead_probe"]["e2e_ms"][k]
            for k in ("p50", "p99")
        }
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
    if "ray_ratios" in payload:
        parts.append(report.ratio_table(payload["ray_ratios"], "aligngate-ray", "aligngate"))
        o = payload["ray_overhead"]
        parts.append(
            "The Ray hop per request (1-token requests, concurrency 1, end-to-end, Ray minus "
            f"local): p50 {o['p50']:+.1f} ms, p99 {o['p99']:+.1f} ms."
        )
    cpu_rows = [
        "| server | load | front-end CPU s | engine CPU s | front-end CPU ms/request "
        "| front-end CPU ms/1k tokens |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in servers.items():
        for s in [r["overhead_probe"], *r["levels"]]:
            cpu = s["cpu"]
            name = "1-token probe" if s is r["overhead_probe"] else report.load_label(s)
            cpu_rows.append(
                f"| {label} | {name} | {cpu['front_end_s']:.1f} | {cpu['engine_s']:.1f} "
                f"| {cpu['front_end_ms_per_request']:.1f} "
                f"| {cpu['front_end_ms_per_1k_tokens']:.0f} |"
            )
    parts.append("\n".join(cpu_rows))
    starts = ", ".join(
        f"{label} {' / '.join(f'{x:.1f}' for x in r['start_s'])} s" for label, r in servers.items()
    )
    parts.append(f"Start to ready: {starts}.")
    return "\n\n".join(parts) + "\n"


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0))
