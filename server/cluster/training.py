"""An online iteration's training as a Ray task: the same worker command the gateway runs as
a child process on one machine (``training.online.run_here``), started on a node of the
cluster that has the resources the models file asks for (``cluster.training``; a GPU when
the cluster has one). The adapters root is shared, so the task reads the exported data
and writes the adapter and its progress file where the front end looks.

Owns: the task, its resources, stopping the worker when the iteration is cancelled.
Does not know: what is trained (the command says), HTTP, the store.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

from server.cluster.config import TrainingTask, training_resources, unplaceable


def _train(cmd: list[str], env: dict[str, str], log_path: str) -> dict[str, Any]:
    """The task's body, on the node Ray picked: run the worker with this node's Python and
    this node's copy of the package (Ray has set ``CUDA_VISIBLE_DEVICES`` to the GPUs it
    granted, which the trainer's ``auto`` device then finds)."""
    import os
    import socket
    import sys

    import ray

    import server

    package_root = str(Path(server.__file__).resolve().parent.parent)
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, *cmd[1:]],
            stdout=subprocess.PIPE,
            stderr=log_file,
            env={**os.environ, **env},
            cwd=package_root,
        )
        try:
            stdout, _ = process.communicate()
        except BaseException:  # ``ray.cancel``: KeyboardInterrupt here; the worker goes too
            process.kill()
            process.wait()
            raise
    return {
        "returncode": process.returncode,
        "stdout": stdout.decode(errors="replace"),
        "node": ray.get_runtime_context().get_node_id(),
        "host": socket.gethostname(),
        "gpus": [str(g) for g in ray.get_gpu_ids()],
    }


async def _result(ref: Any) -> dict[str, Any]:
    return await ref  # type: ignore[no-any-return]


async def run_as_task(
    task: TrainingTask, cmd: list[str], env: dict[str, str], log_path: Path
) -> tuple[int, str, dict[str, Any]]:
    """Run the worker command as a Ray task; its exit status, standard output and where it
    ran (``trained_on``). Cancelling the coroutine cancels the task, which kills the worker;
    so does ``task.timeout_s`` passing (a ``TimeoutError``). A task no node of the cluster
    could ever take fails at once."""
    import ray

    cluster = await asyncio.to_thread(ray.cluster_resources)
    resources = training_resources(task, cluster.get("GPU", 0.0))
    problem = unplaceable(resources, cluster)
    if problem is not None:
        raise RuntimeError(problem)
    remote = ray.remote(_train).options(
        **resources, name="aligngate-train", max_retries=0, retry_exceptions=False
    )
    ref = remote.remote(cmd, env, str(log_path))
    try:
        result = await asyncio.wait_for(_result(ref), task.timeout_s)
    except TimeoutError:
        ray.cancel(ref, force=True)
        raise TimeoutError(
            f"the training task did not finish within {task.timeout_s:g} s "
            "(cluster.training.timeout_s), waiting for a node included; cancelled"
        ) from None
    except asyncio.CancelledError:
        ray.cancel(ref)  # the task's KeyboardInterrupt kills the worker process
        raise
    where = {
        "backend": "ray",
        "node": result["node"],
        "host": result["host"],
        "gpus": result["gpus"],
        "resources": resources,
    }
    return int(result["returncode"]), str(result["stdout"]), where
