"""Start and stop the servers a side-by-side benchmark compares, on loopback only.

Each server is a child process in its own session; it is stopped by its process id (SIGTERM,
then SIGKILL of its process group after a grace period) so no engine process outlives a run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from server.resources.platform import Platform, detect, engine_defaults, engine_dtype

LOOPBACK = "127.0.0.1"


class ServerStartError(RuntimeError):
    """A server process that exited or never became ready."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, slots=True)
class ServerSpec:
    label: str
    argv: Sequence[str]
    port: int
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"


def engine_env(kv_cache_gib: int, extra: Mapping[str, str]) -> dict[str, str]:
    """The vLLM CPU environment both servers get, so they run the same engine configuration."""
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "ALIGNGATE_CPU_KV_CACHE_GIB": str(kv_cache_gib),  # the gateway's one setting for it
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    env.update(extra)
    return env


def platform_flags(platform: Platform | None = None) -> list[str]:
    """``vllm serve`` flags for what the gateway's engines get on ``platform`` (default: this
    machine) when a models file says nothing: its engine defaults and its dtype for `auto`."""
    platform = platform or detect()
    flags: list[str] = []
    for name, value in engine_defaults(platform).items():
        flag = f"--{name.replace('_', '-')}"
        if value is True:
            flags.append(flag)
        elif value is not False:
            flags += [flag, str(value)]
    dtype = engine_dtype("auto", platform)
    return [*flags, "--dtype", dtype] if dtype != "auto" else flags


def raw_vllm(
    model_path: Path,
    served_name: str,
    max_model_len: int,
    env: Mapping[str, str],
    engine_flags: Sequence[str] = (),
) -> ServerSpec:
    """vLLM's own OpenAI server. ``vllm-cpu``'s ``vllm`` console script cannot find its own
    distribution, so it is started as a module; logging is at its leanest (a strict baseline).
    It gets the engine settings the gateway gives this platform (``platform_flags``)."""
    port = free_port()
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_path),
        "--served-model-name", served_name,
        "--host", LOOPBACK,
        "--port", str(port),
        "--max-model-len", str(max_model_len),
        "--seed", "0",
        *platform_flags(),
        "--disable-log-stats",
        "--disable-uvicorn-access-log",
        *engine_flags,
    ]  # fmt: skip
    return ServerSpec("raw-vllm", argv, port, env)


# What `aligngate serve` runs without a models file (server/models/models_file.py:
# default_entries and LoraSettings; tests/test_loadtest.py checks they agree), so that raw
# vLLM can be given the same engine settings: LoRA on, so the online loop can hot-load.
DEFAULT_MAX_MODEL_LEN = 8192
DEFAULT_LORA_FLAGS = ("--enable-lora", "--max-lora-rank", "16", "--max-loras", "2",
                      "--max-cpu-loras", "8")  # fmt: skip


def gateway(
    models_file: Path | None, env: Mapping[str, str], command: Sequence[str] | None = None
) -> ServerSpec:
    """``aligngate serve`` with ``models_file``, or exactly as the README's first command runs
    it (the embedded model, LoRA on, storing on) when there is none."""
    port = free_port()
    base = list(command) if command else [sys.executable, "-m", "server.cli"]
    config = ["--config", str(models_file)] if models_file is not None else []
    argv = [*base, "serve", *config, "--host", LOOPBACK, "--port", str(port)]
    return ServerSpec("aligngate", argv, port, env)


def write_models_file(
    path: Path,
    served_name: str,
    model_path: Path,
    max_model_len: int,
    engine_args: Mapping[str, object] | None = None,
    cluster: Mapping[str, object] | None = None,
    replicas: int = 1,
    replica_cpus: int = 1,
) -> Path:
    """A one-model models file; with ``cluster``, served by ``replicas`` Ray Serve
    replicas of ``replica_cpus`` CPUs each on that cluster (on a CPU node also the threads
    its engine computes with: Ray sets a replica's `OMP_NUM_THREADS` to its CPUs)."""
    import yaml

    entry: dict[str, object] = {
        "name": served_name,
        "path": str(model_path),
        "max_model_len": max_model_len,
    }
    if engine_args:
        entry["engine_args"] = dict(engine_args)
    document: dict[str, object] = {"models": [entry]}
    if cluster is not None:
        entry |= {"replicas": replicas, "num_cpus": replica_cpus}
        document = {"cluster": dict(cluster), **document}
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


class RunningServer:
    def __init__(
        self,
        spec: ServerSpec,
        log_path: Path,
        engine_pids: Callable[[], list[int]] | None = None,
    ):
        # engine_pids: where the engine runs when it is no child of the server (a Ray
        # cluster's processes); its CPU seconds are counted as the engine's.
        self._engine_pids = engine_pids
        self.spec = spec
        self.log_path = log_path
        self.started_s: float | None = None
        self._log = log_path.open("wb")
        env = {**os.environ, **spec.env}
        self._t0 = time.perf_counter()
        self.process = subprocess.Popen(
            list(spec.argv), stdout=self._log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip

    def wait_ready(self, model: str, timeout_s: float = 300.0) -> float:
        """Poll until the model is listed; return the seconds from spawn to ready."""
        deadline = time.perf_counter() + timeout_s
        url = self.spec.base_url + "/v1/models"
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise ServerStartError(
                    f"{self.spec.label} exited with {self.process.returncode}; log: {self.log_path}"
                )
            try:
                response = httpx.get(url, timeout=2.0, trust_env=False)
                if response.status_code == 200 and any(
                    m.get("id") == model for m in response.json().get("data", [])
                ):
                    self.started_s = time.perf_counter() - self._t0
                    return self.started_s
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.25)
        self.stop()
        raise ServerStartError(
            f"{self.spec.label} not ready in {timeout_s:.0f} s; log: {self.log_path}"
        )

    def stop(self, grace_s: float = 30.0) -> int | None:
        pid = self.process.pid
        if self.process.poll() is None:
            os.kill(pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(grace_s)
        # Engine-core children share the server's session (= its pid as process group id).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait(10)
        self._log.close()
        return self.process.returncode

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) so far of the server's own process (the HTTP front end)
        and of its children (vLLM's engine core): on 2 cores, every front-end cycle is one the
        engine does not get."""
        import psutil

        def used(p: psutil.Process) -> float:
            times = p.cpu_times()
            return float(times.user + times.system)

        main = psutil.Process(self.process.pid)
        children = 0.0
        for child in main.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                children += used(child)
        for pid in self._engine_pids() if self._engine_pids else []:
            with contextlib.suppress(psutil.Error):
                children += used(psutil.Process(pid))
        return {"front_end": used(main), "engine": children}

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
