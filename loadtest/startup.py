"""Start to ready: ``aligngate serve`` as the README runs it (the embedded model, LoRA on,
storing on), the same with vLLM's own ``spawn`` for the engine core
(``ALIGNGATE_ENGINE_CORE_PRELOAD=0``: the gateway before the preloaded core), and raw vLLM's
server with the same engine settings — one after another, the order rotating each round,
seconds from the process's spawn until the model is listed on ``/v1/models``.
"""

from __future__ import annotations

import datetime as dt
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.servers import (
    DEFAULT_LORA_FLAGS,
    DEFAULT_MAX_MODEL_LEN,
    RunningServer,
    ServerSpec,
    engine_env,
    gateway,
    raw_vllm,
)

BASELINE = "raw-vllm"


@dataclass(frozen=True, slots=True)
class StartupConfig:
    model_path: Path
    served_name: str
    out_dir: Path
    rounds: int = 3
    kv_cache_gib: int = 2


def _specs(config: StartupConfig) -> list[ServerSpec]:
    env = engine_env(config.kv_cache_gib, {})
    store = {"ALIGNGATE_DATABASE_URL": f"sqlite:///{config.out_dir.resolve()}/store.db"}
    preloaded = gateway(None, {**env, **store})
    spawned = gateway(None, {**env, **store, "ALIGNGATE_ENGINE_CORE_PRELOAD": "0"})
    return [
        raw_vllm(
            config.model_path, config.served_name, DEFAULT_MAX_MODEL_LEN, env, DEFAULT_LORA_FLAGS
        ),
        ServerSpec("aligngate-spawned-core", spawned.argv, spawned.port, spawned.env),
        preloaded,
    ]


def run_startup(config: StartupConfig) -> dict[str, Any]:
    """Round ``r`` starts the servers in the list rotated by ``r``, so no server always
    follows the same one (a page cache warmed by the previous start favours the next)."""
    config.out_dir.mkdir(parents=True, exist_ok=True)
    specs = _specs(config)
    seconds: dict[str, list[float]] = {spec.label: [] for spec in specs}
    for round_ in range(config.rounds):
        shift = round_ % len(specs)
        for spec in specs[shift:] + specs[:shift]:
            log = config.out_dir / f"{spec.label}-{round_ + 1}.log"
            with RunningServer(spec, log) as server:
                ready = server.wait_ready(config.served_name)
            seconds[spec.label].append(ready)
            print(f"round {round_ + 1}: {spec.label} ready in {ready:.1f} s", flush=True)
    payload = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "rounds": config.rounds,
        "model": str(config.model_path),
        "start_s": seconds,
    }
    (config.out_dir / "startup.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
    (config.out_dir / "startup.md").write_text(markdown(seconds), encoding="utf-8")
    return payload


def markdown(seconds: dict[str, Sequence[float]]) -> str:
    """Median, fastest and slowest start per server, and each median against raw vLLM's."""
    baseline = statistics.median(seconds[BASELINE]) if seconds.get(BASELINE) else None
    lines = [
        "| server | starts | median s | min s | max s | median / raw vLLM |",
        "|---|---|---|---|---|---|",
    ]
    for label, runs in seconds.items():
        median = statistics.median(runs)
        ratio = f"{median / baseline:.2f}" if baseline else "—"
        lines.append(
            f"| {label} | {len(runs)} | {median:.1f} | {min(runs):.1f} | {max(runs):.1f} "
            f"| {ratio} |"
        )
    return "\n".join(lines) + "\n"
