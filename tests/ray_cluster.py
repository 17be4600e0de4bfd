"""A throwaway Ray cluster for tests: one head node on loopback, started with `ray start
--head --block` in its own process group, on free ports and its own temp dir, and stopped
by signalling that group only (never `ray stop`, which stops every cluster of the user)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port

RAY = Path(sys.executable).with_name("ray")
START_TIMEOUT_S = 120


@dataclass
class RayHead:
    address: str  # HOST:PORT of its GCS
    process: subprocess.Popen[bytes]
    temp_dir: Path
    log_path: Path
    started_s: float

    def pids(self) -> list[int]:
        """Every live process of this cluster (the session `ray start` began; zombies
        waiting for their parent to read them do not count)."""
        out = subprocess.run(
            ["ps", "-o", "pid=,stat=", "--sid", str(self.process.pid)],
            capture_output=True,
            text=True,
        ).stdout
        rows = [line.split() for line in out.splitlines() if line.strip()]
        return [int(pid) for pid, stat in rows if not stat.startswith("Z")]

    def replica_pids(self, marker: str = "ServeReplica:") -> list[int]:
        """Processes of this cluster whose title holds ``marker`` (default: Ray Serve
        replicas; ``VLLM::EngineCore``: their engines' core processes)."""
        found = []
        for pid in self.pids():
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                if marker.encode() in cmdline:
                    found.append(pid)
        return found


def _gcs_up(address: str) -> bool:
    import socket

    host, port = address.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, int(port))) == 0


@contextlib.contextmanager
def ray_head(num_cpus: int = 2) -> Iterator[RayHead]:
    # Short: Ray puts unix sockets under it (a path limit of ~107 bytes).
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    log_path = temp_dir / "head.log"
    port = free_port()
    ports = {
        "--ray-client-server-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--metrics-export-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
    }
    started = time.monotonic()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                str(RAY),
                "start",
                "--head",
                "--block",
                "--node-ip-address=127.0.0.1",
                f"--port={port}",
                f"--num-cpus={num_cpus}",
                "--num-gpus=0",
                "--include-dashboard=false",
                "--disable-usage-stats",
                f"--temp-dir={temp_dir}",
                f"--object-store-memory={200 * 1024**2}",
                *(f"{flag}={value}" for flag, value in ports.items()),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
            start_new_session=True,
        )
    head = RayHead(f"127.0.0.1:{port}", process, temp_dir, log_path, 0.0)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _gcs_up(head.address) or "--block" not in log_path.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray head did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        head.started_s = time.monotonic() - started
        yield head
    finally:
        stop_head(head)
        if not head.pids():
            shutil.rmtree(temp_dir, ignore_errors=True)


def stop_head(head: RayHead, timeout: float = 20) -> None:
    """SIGTERM to the cluster's process group, then SIGKILL to every process of its
    session still there after ``timeout`` (the session is the one this module started)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while head.pids() and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in head.pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.process.wait(timeout=10)
    deadline = time.monotonic() + 10
    while head.pids() and time.monotonic() < deadline:
        time.sleep(0.2)
