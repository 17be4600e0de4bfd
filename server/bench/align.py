"""``aligngate bench align``: one online-alignment iteration on N judged responses, timed,
against its own training step run alone in the same process.

The store is filled with real conversations and GPT-4 judgments from the CUT repo's training
file, recorded as the gateway records served chat completions. Then the server's own path
runs: ``plan_for`` → ``run_iteration`` (export → ``train cut`` worker process → adapter
folder → hot-load into the running vLLM engine). The baseline is the same training
(``train_cut_adapter``, same data, same settings) in this process with nothing else going on;
the ratio is what the loop costs on top of training.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from server.models.adapter_meta import META_FILE
from server.models.models_file import ModelEntry
from server.models.registry import Registry
from server.models.render import Message
from server.protocol import Hyperparameters
from server.settings import Settings
from server.store import Store
from server.store.records import ChoiceRecord, CompletionRecord, FeedbackCreate
from server.training.cut_data import read_records
from server.training.online import DATA_FILE, AlignJob, run_iteration
from server.training.service import method_config, plan_for
from server.training.trainer import train_cut_adapter

log = logging.getLogger(__name__)

ANNOTATOR = "bench"  # the seeded judgments' annotator, trusted by the iteration


async def _seed(store: Store, entry_name: str, renderer: Any, records: list[Any]) -> None:
    """Each record as a stored chat completion of ``entry_name`` plus its feedback."""
    for record in records:
        instruction = record.instruction  # the CUT file's `input` is already joined to it
        rendered = renderer.render_chat([Message("user", instruction)])
        completion = CompletionRecord(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created_at=time.time(),
            endpoint="chat",
            model=entry_name,
            family=renderer.family,
            template_fingerprint=renderer.fingerprint,
            request=[{"role": "user", "content": instruction}],
            prompt_text=rendered.text,
            sampling={"temperature": 0.0},
            choices=[ChoiceRecord(index=0, text=record.output, finish_reason="stop")],
            prompt_tokens=len(rendered.token_ids),
            completion_tokens=0,
            latency_ms=0.0,
        )
        await asyncio.wrap_future(store.record_completion(completion))
        if record.judgment is None:
            feedback = FeedbackCreate(completion.id, label="desirable", annotator=ANNOTATOR)
        else:
            feedback = FeedbackCreate(completion.id, judgment=record.judgment, annotator=ANNOTATOR)
        await store.add_feedback(feedback)


def bench_align(
    entry: ModelEntry,
    settings: Settings,
    data: Path,
    *,
    judged: int,
    fine: int,
    hyperparameters: Hyperparameters,
) -> dict[str, Any]:
    records, _ = read_records(data)
    judged_records = [r for r in records if r.judgment is not None][:judged]
    fine_records = [r for r in records if r.judgment is None][:fine]
    if len(judged_records) < judged:
        raise ValueError(f"{data} has only {len(judged_records)} judged records")
    config = method_config("cut", hyperparameters)

    with tempfile.TemporaryDirectory(prefix="aligngate-bench-align-") as tmp:
        root = Path(tmp) / "adapters"
        root.mkdir()
        registry = Registry(adapters_root=root)
        store = Store.open(f"sqlite:///{tmp}/store.db")

        async def iteration() -> AlignJob:
            try:
                await registry.start([entry], settings)
                model = registry.get(entry.name)
                await _seed(store, entry.name, model.renderer, judged_records + fine_records)
                plan = plan_for(
                    registry, entry.name, since=None, trusted=(ANNOTATOR,), method="cut"
                )
                job = AlignJob(id=f"align-{uuid.uuid4().hex[:12]}", model=entry.name)

                async def load(name: str, path: str) -> None:
                    await registry.load_adapter(name, path, base=plan.base_name)

                started = time.perf_counter()
                await run_iteration(plan, store, config, job, load)
                job.timings["iteration_s"] = round(time.perf_counter() - started, 2)
                return job
            finally:
                registry.shutdown()

        try:
            job = asyncio.run(iteration())
        finally:
            store.close()
        if job.status != "succeeded":
            raise RuntimeError(f"the iteration failed: {job.error}")

        # Baseline: the same training alone, on the data the iteration trained on.
        adapter = root / str(job.adapter)
        meta = json.loads((adapter / META_FILE).read_text())
        started = time.perf_counter()
        _, report, dataset = train_cut_adapter(
            base=Path(meta["base_model"]["path"]),
            data=adapter / DATA_FILE,
            out=Path(tmp) / "baseline",
            config=config,
            base_name=entry.name,
        )
        baseline_s = time.perf_counter() - started

    train = job.train or {}
    return {
        "model": entry.name,
        "judged": job.judged,
        "records": job.records,
        "trained_examples": dataset.judged + dataset.fine,
        "hyperparameters": dataclasses.asdict(config),
        "iteration": {**job.timings, "train_loop": train},
        "baseline": {"train_s": round(baseline_s, 2), "train_loop": report.as_dict()},
        # > 1: what the loop (export, worker start-up, hot-load) adds to the training itself
        "iteration_over_baseline": round(job.timings["iteration_s"] / baseline_s, 3),
    }
