"""``aligngate bench store``: durable feedback writes acknowledged per second, and their
latency, with group commit (many writers at once) against a baseline measured in the same
run (one writer: a commit per write).

Each acknowledged write is committed (SQLite WAL + synchronous=FULL, or PostgreSQL's
synchronous_commit) before its call returns.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from server.store import ChoiceRecord, CompletionRecord, FeedbackCreate, Store


@dataclass
class StoreBenchResult:
    backend: str
    concurrency: int
    writes: int
    seconds: float
    writes_per_s: float
    p50_ms: float
    p99_ms: float


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _run(store: Store, completion_id: str, writes: int, concurrency: int) -> StoreBenchResult:
    semaphore = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    run = uuid.uuid4().hex[:8]

    async def one(i: int) -> None:
        async with semaphore:
            started = time.perf_counter()
            await store.add_feedback(
                FeedbackCreate(
                    completion_id=completion_id,
                    judgment=f"bench judgment {i}",
                    idempotency_key=f"bench-{run}-{i}",
                    annotator="bench",
                )
            )
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(writes)))
    seconds = time.perf_counter() - started
    return StoreBenchResult(
        backend=store.engine.dialect.name,
        concurrency=concurrency,
        writes=writes,
        seconds=round(seconds, 3),
        writes_per_s=round(writes / seconds, 1),
        p50_ms=round(statistics.median(latencies) * 1000, 2),
        p99_ms=round(_percentile(latencies, 0.99) * 1000, 2),
    )


def bench_store(
    url: str | None, *, writes: int = 2000, concurrency: int = 64, baseline_writes: int = 300
) -> list[dict[str, float | int | str]]:
    """Runs the baseline (concurrency 1) and the group-commit run on one fresh store."""
    tmp = None
    if url is None:
        tmp = tempfile.TemporaryDirectory(prefix="aligngate-bench-")
        url = f"sqlite:///{Path(tmp.name) / 'bench.db'}"
    store = Store.open(url)
    try:
        completion_id = f"bench-{uuid.uuid4().hex}"
        store.record_completion(
            CompletionRecord(
                id=completion_id,
                created_at=time.time(),
                endpoint="chat",
                model="bench",
                family="chat",
                template_fingerprint="bench",
                request=[],
                prompt_text="",
                sampling={},
                choices=[ChoiceRecord(0, "", "stop")],
                prompt_tokens=0,
                completion_tokens=0,
                latency_ms=0.0,
            )
        ).result(timeout=30)

        async def both() -> list[StoreBenchResult]:
            await _run(store, completion_id, 50, concurrency)  # warm-up
            baseline = await _run(store, completion_id, baseline_writes, 1)
            grouped = await _run(store, completion_id, writes, concurrency)
            return [baseline, grouped]

        results = asyncio.run(both())
    finally:
        store.close()
        if tmp is not None:
            tmp.cleanup()
    rows: list[dict[str, float | int | str]] = [asdict(r) for r in results]
    rows[1]["speedup_vs_commit_per_write"] = round(
        results[1].writes_per_s / results[0].writes_per_s, 2
    )
    return rows
