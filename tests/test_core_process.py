"""A CPU engine's core process forks from a process that imported vLLM while the gateway
started (instead of vLLM's ``spawn``, whose fresh interpreter re-imports vLLM for ~13 s),
and only when the fork gives the process ``spawn`` would have."""

from __future__ import annotations

import multiprocessing
import os

import psutil
import pytest

from server.engine import core_process
from tests.conftest import Gateway


def test_only_vllm_variables_may_differ_between_the_gateway_and_the_fork_server() -> None:
    server = {"PATH": "/bin", "LD_PRELOAD": "/lib/libgomp.so.1", "VLLM_CPU_KVCACHE_SPACE": "2"}
    assert core_process.blocking_differences(dict(server), server) == []
    # vLLM reads its own variables when it uses them: the child gets the gateway's values.
    later = server | {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_SSM_CONV_STATE_LAYOUT": "SD"}
    assert core_process.blocking_differences(later, server) == []
    # Read by the dynamic loader, OpenMP or an import: a fork could not apply them.
    assert core_process.blocking_differences(
        later | {"LD_PRELOAD": "", "OMP_NUM_THREADS": "1"}, server
    ) == ["LD_PRELOAD", "OMP_NUM_THREADS"]
    assert core_process.blocking_differences({"PATH": "/bin"}, server) == ["LD_PRELOAD"]


def _report(queue: multiprocessing.Queue, name: str) -> None:  # type: ignore[type-arg]
    queue.put((os.environ.get(name), os.getppid()))


def test_a_core_process_runs_with_the_environment_the_gateway_has_when_it_starts_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    context = core_process._CORE_CONTEXT
    queue = context.Queue()
    first = context.Process(target=_report, args=(queue, "ALIGNGATE_PROBE"))
    first.start()  # starts the fork server, without the variable
    value, parent = queue.get(timeout=60)
    first.join(30)
    assert value is None
    assert parent != os.getpid()  # a child of the fork server, not of this process
    monkeypatch.setenv("ALIGNGATE_PROBE", "set after the fork server started")
    second = context.Process(target=_report, args=(queue, "ALIGNGATE_PROBE"))
    second.start()
    assert queue.get(timeout=60) == ("set after the fork server started", parent)
    second.join(30)
    assert second.exitcode == 0


def test_the_gateway_forks_its_engine_core_from_the_preloaded_process(gateway: Gateway) -> None:
    """The fork server's environment matches what vLLM 0.32's CPU platform gives a spawned
    core (else the gateway would log that it spawned), and the core is its child."""
    log = gateway.log_path.read_text(errors="replace")
    assert "Engine core forked from the preloaded process" in log, gateway.log_tail()
    assert "Engine core spawned" not in log
    descendants = psutil.Process(gateway.process.pid).children(recursive=True)
    cores = [p for p in descendants if "EngineCore" in p.name() + " ".join(p.cmdline())]
    assert len(cores) == 1, [p.name() for p in descendants]
    server = psutil.Process(cores[0].ppid())
    assert "forkserver" in " ".join(server.cmdline())
    assert server.ppid() == gateway.process.pid
