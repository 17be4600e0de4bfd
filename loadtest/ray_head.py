"""A throwaway one-node Ray cluster on loopback for the `aligngate-ray` benchmark row: `ray
start --head --block` in its own session, on free ports and its own temp dir, stopped by
signalling that session only (never `ray stop`, which stops every cluster of the user).
Started with the benchmark's engine environment, which the replicas (Ray workers) inherit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from loadtest.servers import LOOPBACK, free_port

START_TIMEOUT_S = 120


@dataclass
class RayHead:
    address: str  # HOST:PORT of its GCS
    process: subprocess.Popen[bytes]

    def pids(self) -> list[int]:
        """Every live process of the cluster's session (replicas and engines included)."""
        out = subprocess.run(
            ["ps", "-o", "pid=,stat=", "--sid", str(self.process.pid)],
            capture_output=True,
            text=True,
        ).stdout
        rows = [line.split() for line in out.splitlines() if line.strip()]
        return [int(pid) for pid, stat in rows if not stat.startswith("Z")]


@contextlib.contextmanager
def ray_head(env: Mapping[str, str], log_path: Path, num_cpus: int = 2) -> Iterator[RayHead]:
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: unix socket paths
    port = free_port()
    flags = [
        f"--{name}={free_port()}"
        for name in (
            "ray-client-server-port",
            "node-manager-port",
            "object-manager-port",
            "metrics-export-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
        )
    ]
    ray = Path(sys.executable).with_name("ray")
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                str(ray), "start", "--head", "--block",
                f"--node-ip-address={LOOPBACK}", f"--port={port}",
                f"--num-cpus={num_cpus}", "--num-gpus=0",
                "--include-dashboard=false", "--disable-usage-stats",
                f"--temp-dir={temp_dir}", f"--object-store-memory={200 * 1024**2}",
                *flags,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env, "RAY_USAGE_STATS_ENABLED": "0"},
            start_new_session=True,
        )  # fmt: skip
    head = RayHead(f"{LOOPBACK}:{port}", process)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "--block" not in log_path.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray head did not start; log: {log_path}")
            time.sleep(0.5)
        yield head
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while head.pids() and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in head.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)
