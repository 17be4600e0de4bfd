"""The listening port is bound before anything starts, as ``vllm serve`` binds it (issue 32,
item 12): a busy port fails at once, before any engine, with a clear message; while the
engines start, no other process can take the port."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, Gateway, free_port


def _serve(port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
        cwd=REPO,
        start_new_session=True,
    )


def test_item_12_a_busy_port_fails_at_once(test_env: dict[str, str], tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        log = tmp_path / "serve.log"
        process = _serve(port, test_env, log)
        assert process.wait(timeout=120) == 2
    text = log.read_text()
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in text, text
    assert "EngineCore" not in text and "Engine for" not in text, text  # nothing started


@pytest.mark.slow
def test_item_12_the_port_is_bound_before_the_engines_start(
    test_env: dict[str, str], default_model_path: Path, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    process = _serve(port, test_env, log)
    try:
        deadline = time.monotonic() + 300
        while "EngineCore" not in log.read_text(errors="replace"):  # the engine is starting
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert "Application startup complete" not in log.read_text(errors="replace")
        with socket.socket() as other, pytest.raises(OSError) as taken:
            other.bind(("127.0.0.1", port))
        assert taken.value.errno == errno.EADDRINUSE
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_item_12_the_log_says_where_it_listens(gateway: Gateway) -> None:
    """On the socket bound before start-up, the log still says where it serves (uvicorn
    says so only for sockets it binds itself)."""
    assert f"Uvicorn running on {gateway.url}" in gateway.log_path.read_text(errors="replace")
