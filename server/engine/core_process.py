"""Where a CPU engine's core process comes from: forked from a process that has already
imported vLLM, instead of a fresh interpreter that imports it again.

vLLM's CPU platform always starts ``AsyncLLM``'s engine core with ``spawn``
(``platforms/cpu.py`` sets ``VLLM_WORKER_MULTIPROC_METHOD=spawn``), and the new interpreter
spends ~13 s here importing vLLM before it loads a 0.25 GiB model in 0.4 s. ``preload()``
starts a multiprocessing fork server early (the gateway calls it before building
renderers), which imports the engine core's modules while the gateway does its own work;
``install()`` then makes vLLM start each engine core from it. The child is what ``spawn``
would have run — the same pickled process object, ``__main__`` and ``sys.path`` — with the
environment the gateway has at the engine's start, applied before vLLM runs.

Right by construction: a variable read while starting a process or importing a library
(``LD_PRELOAD``: the libgomp vLLM preloads for thread binding; ``OMP_*``; torch inductor's)
cannot be applied after the fork. The fork server therefore starts with the values vLLM's
CPU platform sets (``_vllm_cpu_environment``, vLLM 0.32's), and a core is forked only when
the gateway's environment at that moment differs from the server's (after its imports, which
set a few variables as they do in the gateway) in ``VLLM_*`` variables alone (vLLM reads
those when used); otherwise vLLM's own ``spawn`` runs, with a warning naming them.

Owns: the fork server, vLLM's multiprocessing-context hook. Does not decide when to preload
(``resources.platform.engine_core_preloaded``).
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import multiprocessing
import os
import sys
import threading
from collections.abc import Mapping
from multiprocessing.context import ForkServerContext, ForkServerProcess
from typing import Any

log = logging.getLogger(__name__)

# What the engine core imports before it can load a model: the core loop, the uniprocess
# executor and the CPU worker with its model runner (model classes load on demand).
PRELOADED_MODULES = (
    "vllm.v1.engine.core",
    "vllm.v1.executor.uniproc_executor",
    "vllm.v1.worker.cpu_worker",
)

# The environment before this process first imported vLLM, when something imported it before
# the fork server started (the serve command's parser is vLLM's): see ``preload``.
_before_vllm: dict[str, str] | None = None

_lock = threading.Lock()
_probe_lock = threading.Lock()  # engines start side by side on a CPU
_server_environment: dict[str, str] | None = None  # the fork server's, once started
_server_after_imports: dict[str, str] | None = None
_installed = False


def _vllm_cpu_environment(tensor_parallel_size: int = 1) -> dict[str, str]:
    """The variables vLLM 0.32's CPU platform sets before it spawns an engine core
    (``CpuPlatform.check_and_update_config``) that a process reads at start or import,
    computed the same way; ``tests/test_core_process.py`` checks them against vLLM's."""
    torch_pkg = os.path.dirname(importlib.util.find_spec("torch").origin or "")
    vllm_pkg = os.path.dirname(importlib.util.find_spec("vllm").origin or "")
    preload = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p]
    if not any(lib in p for p in preload for lib in ("libomp", "libgomp", "libiomp")):
        gomp = [
            found
            for folder in (
                os.path.join(os.path.dirname(torch_pkg), "torch.libs"),
                os.path.join(torch_pkg, "lib"),
            )
            for found in glob.glob(os.path.join(folder, "libgomp*.so*"))
        ]
        preload += gomp[:1]
    if not any("libtcmalloc" in p for p in preload):
        for pattern in ("libtcmalloc_minimal*.so*", "libtcmalloc.so*"):
            tcmalloc = glob.glob(os.path.join(vllm_pkg, "libs", pattern))
            if tcmalloc:
                preload.insert(0, tcmalloc[0])
                break
    environment = {
        "NUMEXPR_MAX_THREADS": str(len(os.sched_getaffinity(0))),
        "TORCHINDUCTOR_COMPILE_THREADS": "1",
        "TORCHINDUCTOR_CPP_DYNAMIC_THREADS": "1",
        "LOCAL_WORLD_SIZE": str(tensor_parallel_size),
        "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
        "VLLM_DISABLE_SHARED_EXPERTS_STREAM": "1",
    }
    if preload:
        environment["LD_PRELOAD"] = ":".join(preload)
    return environment


def note_environment_before_vllm() -> None:
    """Call before this process first imports vLLM (once is enough). vLLM's import changes
    a few variables (opencv prepends its ``lib64`` to ``LD_LIBRARY_PATH``); the fork server
    then starts with those as they were before, so that its own import sets them exactly as
    the gateway's did, and the cores still fork (they would be spawned, ~13 s slower each,
    if the server's import added them a second time)."""
    global _before_vllm
    if _before_vllm is None and "vllm" not in sys.modules:
        _before_vllm = dict(os.environ)


def _undone_by_vllms_import(keep: Mapping[str, str]) -> dict[str, str | None]:
    """The variables vLLM's import in this process changed (not ``VLLM_*``, not ``keep``),
    with their value before it (None: unset)."""
    if _before_vllm is None:
        return {}
    return {
        name: _before_vllm.get(name)
        for name in set(_before_vllm) | set(os.environ)
        if not name.startswith("VLLM_")
        and name not in keep
        and os.environ.get(name) != _before_vllm.get(name)
    }


def preload(modules: tuple[str, ...] = PRELOADED_MODULES) -> None:
    """Start the fork server now; it imports ``modules`` in the background (the gateway
    goes on at once). Call once the engine environment is set (``VLLM_CPU_KVCACHE_SPACE``,
    …); later changes to ``VLLM_*`` variables still reach the cores. Idempotent."""
    global _server_environment
    with _lock:
        if _server_environment is not None:
            return
        platform_values = _vllm_cpu_environment()
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(list(modules))
        values: dict[str, str | None] = {
            **_undone_by_vllms_import(platform_values),
            **platform_values,
        }
        saved = {name: os.environ.get(name) for name in values}
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        try:  # the server process starts with this environment and keeps it
            from multiprocessing import forkserver

            forkserver.ensure_running()
            _server_environment = dict(os.environ)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    log.info("Engine-core fork server started; it imports vLLM while the gateway starts")


def blocking_differences(current: Mapping[str, str], server: Mapping[str, str]) -> list[str]:
    """Variables whose value differs between the gateway now and the fork server, other
    than ``VLLM_*`` (read when used): any of them means a fork would not match spawn."""
    return sorted(
        name
        for name in set(current) | set(server)
        if current.get(name) != server.get(name) and not name.startswith("VLLM_")
    )


class _CoreProcess(ForkServerProcess):
    """A fork-server process that takes the parent's environment as of ``start()``."""

    def start(self) -> None:
        self._environment = dict(os.environ)
        super().start()

    def run(self) -> None:
        # Only what differs: rewriting every variable moves the C environment away from
        # argv's memory, where setproctitle writes "VLLM::EngineCore".
        for name in set(os.environ) - set(self._environment):
            del os.environ[name]
        for name, value in self._environment.items():
            if os.environ.get(name) != value:
                os.environ[name] = value
        super().run()


class _CoreContext(ForkServerContext):
    Process = _CoreProcess  # type: ignore[assignment]


_CORE_CONTEXT = _CoreContext()


def _report_environment(connection: Any) -> None:
    connection.send(dict(os.environ))
    connection.close()


def _forked_environment() -> dict[str, str]:
    """The environment a child of the fork server starts with: the server's after its
    imports (vLLM's import sets a few variables of its own, as it does in the gateway).
    Waits for those imports to finish; asked once."""
    global _server_after_imports
    with _probe_lock:
        if _server_after_imports is not None:
            return _server_after_imports
        context = multiprocessing.get_context("forkserver")
        reader, writer = context.Pipe(duplex=False)
        probe = context.Process(target=_report_environment, args=(writer,), daemon=True)
        probe.start()
        writer.close()
        _server_after_imports = reader.recv()
        probe.join()
        return _server_after_imports


def _choose_context(vllm_choice: Any) -> Any:
    """vLLM's choice (``spawn`` on CPU), or the fork server where it would give the same
    process."""
    if _server_environment is None or vllm_choice.get_start_method() != "spawn":
        return vllm_choice
    differing = blocking_differences(os.environ, _forked_environment())
    if differing:
        log.warning(
            "Engine core spawned, not forked from the preloaded process: %s differ from "
            "its environment",
            ", ".join(differing),
        )
        return vllm_choice
    log.info("Engine core forked from the preloaded process")
    return _CORE_CONTEXT


def install() -> None:
    """Route vLLM's engine-core start through ``_choose_context`` (once; a no-op unless
    ``preload()`` ran). Imports vLLM: call where the engine starts."""
    global _installed
    with _lock:
        if _installed or _server_environment is None:
            return
        import vllm.v1.engine.utils as engine_utils

        vllm_get_mp_context = engine_utils.get_mp_context
        engine_utils.get_mp_context = lambda: _choose_context(vllm_get_mp_context())
        _installed = True
