"""One online-alignment iteration (the CUT paper's loop, inside the gateway, for every
method): feedback collected since the last iteration → the training data of the model's
method (CUT, KTO, DPO or Quark: ``training.methods``) → LoRA training in a worker
process (serving goes on; on a Ray cluster a Ray task, ``cluster.training``) →
``<adapters>/<base>-iter<K>`` → hot-loaded as model
``<base>-iter<K>``.

An iteration on an adapter's traffic continues training that adapter; an iteration on a base
model's traffic starts a fresh LoRA. Each adapter's metadata records its iteration and the
feedback watermark up to which it consumed judgments (the store's commit-ordered sequence,
not a wall-clock time: a judgment committed late still falls in the next window), so the
next iteration starts there.

Owns: planning, the job's state, the worker process. Does not know: HTTP, SQL, vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from server.feedback.export import build_export
from server.models.adapter_meta import META_FILE, read_meta, write_json_atomic
from server.store import Store
from server.store.locks import HeldLock
from server.training.arguments import TrainingArgs
from server.training.methods import METHODS

log = logging.getLogger(__name__)

DATA_FILE = "train-data.json"
Status = Literal["queued", "exporting", "training", "loading", "gating", "succeeded", "failed"]
# After loading: judge the candidate against the promoted version and promote it if it wins;
# returns the gate's report (``promoted``, ``reason``, win rate, interval, cost).
Gate = Callable[[str], Awaitable[dict[str, Any]]]


class AlignError(ValueError):
    """An iteration that cannot start (nothing to train on, a job already running, ...)."""


@dataclass(frozen=True)
class AlignPlan:
    model: str  # whose judgments are used: a served base model or adapter
    base_name: str  # the base model the adapters run on
    base_path: Path
    family: str | None
    template: str | None
    init_adapter: Path | None  # continue training this adapter (``model`` is an adapter)
    iteration: int
    since: float | None  # an explicit time filter (``--since``), else None
    root: Path
    # Only reviewed judgments or these annotators' train; None: every judgment.
    trusted: tuple[str, ...] | None = ()
    trust_remote_code: bool = False  # from the base's models-file entry
    # Feedback committed after this watermark (the previous iteration's); None: from the start.
    after_seq: int | None = None
    method: str = "cut"  # cut | kto | dpo | quark (``training.methods``)
    # Quark: the entry's own quantile prefixes (None: the family's).
    quantile_tokens: tuple[str, ...] | None = None
    # The share of the model's traffic held out from training (``feedback.holdout``).
    holdout: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.base_name}-iter{self.iteration}"

    @property
    def out(self) -> Path:
        return self.root / self.name


def previous_iterations(root: Path, base_name: str) -> list[dict[str, Any]]:
    """The ``online`` sections of this base's earlier iterations, oldest first."""
    found = []
    if root.is_dir():
        for folder in root.iterdir():
            if not re.fullmatch(re.escape(base_name) + r"-iter\d+", folder.name):
                continue
            try:
                meta = read_meta(folder)
            except ValueError:
                continue
            online = (meta or {}).get("online")
            if isinstance(online, dict) and isinstance(online.get("iteration"), int):
                found.append(online)
    return sorted(found, key=lambda o: o["iteration"])


def plan_iteration(
    *,
    model: str,
    base_name: str,
    base_path: Path,
    family: str | None,
    template: str | None,
    adapter_path: Path | None,
    root: Path,
    since: float | None = None,
    trusted: tuple[str, ...] | None = (),
    trust_remote_code: bool = False,
    method: str = "cut",
    quantile_tokens: tuple[str, ...] | None = None,
    holdout: float = 0.0,
) -> AlignPlan:
    history = previous_iterations(root, base_name)
    iteration = (history[-1]["iteration"] + 1) if history else 1
    after_seq = history[-1].get("through_seq") if history else None
    if since is None and history and after_seq is None:
        since = history[-1].get("until")  # an adapter from before the watermark
    return AlignPlan(
        model=model,
        base_name=base_name,
        base_path=base_path,
        family=family,
        template=template,
        init_adapter=adapter_path,
        iteration=iteration,
        since=since,
        root=root,
        trusted=trusted,
        trust_remote_code=trust_remote_code,
        after_seq=after_seq,
        method=method,
        quantile_tokens=quantile_tokens,
        holdout=holdout,
    )


@dataclass
class AlignJob:
    id: str
    model: str
    status: Status = "queued"
    method: str = "cut"
    adapter: str | None = None
    iteration: int | None = None
    since: float | None = None
    until: float | None = None  # when the export read (for people; selection is by sequence)
    after_seq: int | None = None
    through_seq: int | None = None  # the watermark this iteration consumed up to
    feedback_rows: int = 0
    records: int = 0
    judged: int = 0  # cut: judged responses
    examples: int = 0  # the method's usable units: judged responses, labels, pairs, rewards
    held_out: int = 0  # feedback rows on held-out completions (not trained on)
    superseded: int = 0  # verdicts replaced by a later one on the same choice
    conflicts: int = 0  # choices whose verdicts disagreed (the latest won)
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    train: dict[str, Any] | None = None
    trained_on: dict[str, Any] | None = None  # where the worker ran (``TrainingRun.where``)
    gate: dict[str, Any] | None = None  # the promotion gate's report
    promoted: bool = False
    error: str | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        return {"object": "align.job", **asdict(self)}


def _train_command(plan: AlignPlan, data: Path, progress: Path, settings: Path) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "server.cli",
        "train",
        plan.method,
        "--base",
        str(plan.base_path),
        "--data",
        str(data),
        "--out",
        str(plan.out),
        "--base-name",
        plan.base_name,
        "--progress-file",
        str(progress),
        "--hyperparameters",
        str(settings),
    ]
    if plan.family:
        cmd += ["--family", plan.family]
    if plan.template:
        cmd += ["--template", plan.template]
    if plan.init_adapter:
        cmd += ["--init-adapter", str(plan.init_adapter)]
    if plan.trust_remote_code:
        cmd += ["--trust-remote-code"]
    if plan.quantile_tokens and plan.method == "quark":
        cmd += ["--quantile-tokens", ",".join(plan.quantile_tokens)]
    return cmd


@dataclass
class TrainingRun:
    """What a training worker left: its exit status, its standard output (the last line
    is the run's JSON summary) and where it ran."""

    returncode: int
    stdout: str
    where: dict[str, Any]


# Runs the training command (``cmd[0]`` is a Python interpreter) with ``env`` added to the
# environment, its standard error into ``log_path``; cancelling it stops the worker.
TrainingRunner = Callable[[list[str], dict[str, str], Path], Awaitable[TrainingRun]]


async def run_here(cmd: list[str], env: dict[str, str], log_path: Path) -> TrainingRun:
    """The worker as a child process of this gateway (one machine)."""
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            *cmd,
            stdout=asyncio.subprocess.PIPE,
            stderr=log_file,
            env={**os.environ, **env},
        )
        try:
            stdout, _ = await process.communicate()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert process.returncode is not None
    return TrainingRun(process.returncode, stdout.decode(errors="replace"), {"backend": "local"})


async def _watch_progress(job: AlignJob, path: Path) -> None:
    while True:
        await asyncio.sleep(0.5)
        try:
            lines = (await asyncio.to_thread(path.read_text)).splitlines()
        except FileNotFoundError:
            continue
        if lines:
            last = json.loads(lines[-1])
            job.step, job.total_steps, job.loss = last["step"], last["total"], last["loss"]


async def run_iteration(
    plan: AlignPlan,
    store: Store,
    config: TrainingArgs,
    job: AlignJob,
    load: Callable[[str, str], Awaitable[None]] | None = None,
    min_records: int | None = None,
    gate: Gate | None = None,
    lock: HeldLock | None = None,
    runner: TrainingRunner = run_here,
) -> AlignJob:
    """Export → train (a worker process: ``runner`` starts it here or on a cluster) → write
    the adapter → ``load(name, folder)`` → ``gate(name)``: promoted only if it wins;
    otherwise it stays served under its own name. ``lock`` (the base's iteration lock, taken
    before planning) is released at the end. ``min_records``: the fewest usable units of
    the method's feedback (default: the method's own minimum); a window with fewer ends
    the job before anything trains."""
    method = METHODS[plan.method]
    job.iteration, job.since, job.adapter = plan.iteration, plan.since, plan.name
    job.method = plan.method
    job.after_seq = plan.after_seq
    work = plan.root / ".align" / job.id
    try:
        if plan.out.exists():
            raise AlignError(f"{plan.out} already exists")
        started = time.perf_counter()
        job.status = "exporting"
        job.until = time.time()
        # Read the watermark first: every row at or below it is committed, so the window
        # (after_seq, through_seq] is complete now and the next one starts where it ends.
        job.through_seq = await asyncio.to_thread(store.feedback_watermark)
        rows, records = await asyncio.to_thread(
            store.export_rows,
            model=plan.model,
            since=plan.since,
            after_seq=plan.after_seq,
            through_seq=job.through_seq,
            trusted=plan.trusted,
        )
        items, report = build_export(method.export_format, rows, records, plan.holdout)
        job.feedback_rows, job.records = len(rows), len(items)
        job.superseded, job.conflicts = report.superseded, report.conflicts
        job.held_out = report.held_out
        job.examples = method.count(items)
        if plan.method == "cut":
            job.judged = job.examples
        needed = min_records or method.min_units
        if job.examples < needed:
            raise AlignError(
                method.shortfall(job.examples, needed, plan.model, plan.trusted is not None)
            )
        work.mkdir(parents=True, exist_ok=True)
        data = work / DATA_FILE
        write_json_atomic(data, items)
        job.timings["export_s"] = round(time.perf_counter() - started, 3)

        job.status = "training"
        started = time.perf_counter()
        progress = work / "progress.jsonl"
        log_path = work / "train.log"
        settings = work / "hyperparameters.json"
        config.to_json(settings)
        watcher = asyncio.create_task(_watch_progress(job, progress))
        try:
            run = await runner(
                _train_command(plan, data, progress, settings), {"TQDM_DISABLE": "1"}, log_path
            )
        finally:
            watcher.cancel()
        job.trained_on = run.where
        if run.returncode != 0:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise AlignError("training failed: " + " | ".join(tail))
        job.train = json.loads(run.stdout.strip().splitlines()[-1])
        job.timings["train_s"] = round(time.perf_counter() - started, 3)

        # The adapter keeps its training data and its place in the loop.
        shutil.move(str(data), plan.out / DATA_FILE)
        meta = read_meta(plan.out) or {}
        meta["data"] = {**meta.get("data", {}), "path": DATA_FILE}
        meta["online"] = {
            "iteration": plan.iteration,
            "model": plan.model,
            "base": plan.base_name,
            "since": plan.since,
            "until": job.until,
            "after_seq": plan.after_seq,
            "through_seq": job.through_seq,
            "feedback_rows": job.feedback_rows,
            "job": job.id,
        }
        write_json_atomic(plan.out / META_FILE, meta)

        if load is not None:
            job.status = "loading"
            started = time.perf_counter()
            await load(plan.name, plan.name)
            job.timings["load_s"] = round(time.perf_counter() - started, 3)
            if gate is not None:
                job.status = "gating"
                started = time.perf_counter()
                job.gate = await gate(plan.name)
                job.promoted = bool(job.gate.get("promoted"))
                job.timings["gate_s"] = round(time.perf_counter() - started, 3)
        job.status = "succeeded"
    except asyncio.CancelledError:
        job.status, job.error = "failed", "cancelled"
        raise
    except Exception as exc:
        job.status, job.error = "failed", str(exc)
        log.warning("Align job %s failed: %s", job.id, exc)
    finally:
        job.finished = time.time()
        shutil.rmtree(work, ignore_errors=True)
        if lock is not None:
            await asyncio.to_thread(lock.release)
    return job


class AlignJobs:
    """The server's iterations: one at a time (training shares the CPU with serving)."""

    def __init__(self) -> None:
        self._jobs: dict[str, AlignJob] = {}
        self._tasks: set[asyncio.Task[AlignJob]] = set()

    def get(self, job_id: str) -> AlignJob | None:
        return self._jobs.get(job_id)

    def running(self) -> AlignJob | None:
        return next(
            (j for j in self._jobs.values() if j.status not in ("succeeded", "failed")), None
        )

    def start(
        self,
        plan: AlignPlan,
        store: Store,
        config: TrainingArgs,
        load: Callable[[str, str], Awaitable[None]],
        min_records: int | None = None,
        gate: Gate | None = None,
        lock: HeldLock | None = None,
        runner: TrainingRunner = run_here,
    ) -> AlignJob:
        busy = self.running()
        if busy is not None:
            raise AlignError(f"align job {busy.id} is still {busy.status}")
        job = AlignJob(
            id=f"align-{uuid.uuid4().hex[:12]}",
            model=plan.model,
            method=plan.method,
            adapter=plan.name,
            iteration=plan.iteration,
            since=plan.since,
        )
        self._jobs[job.id] = job
        task = asyncio.create_task(
            run_iteration(plan, store, config, job, load, min_records, gate, lock, runner),
            # Not the admin request's context: the job outlives it (its id, its span).
            context=contextvars.Context(),
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
