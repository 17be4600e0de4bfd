"""Judges at work on stored completions: ``aligngate judge`` over the store, and the
background sampler that judges a fraction of live traffic.

Owns: what a verdict becomes in the store (a feedback row under the judge's own key id,
annotator ``judge:<name>``, plus a ``judge_calls`` row with model, prompt version, raw reply,
parsed verdict, latency and tokens, in one transaction), which choices are judged (every
choice for ``judgment``/``score``; disjoint pairs of one completion's choices — 0 vs 1, 2 vs 3
— for ``pairwise``), and the sampler's queue, sampling and shutdown.
Does not know: HTTP routes, the engine, how a judge is asked (``judges``). An unparseable
reply or a failed call is counted and logged, never stored.

The sampler never touches the request path: the serving code calls
``completion_recorded`` from the store's commit callback (any thread); the record is handed
to the event loop, sampled, and put in the judge's bounded queue — or dropped and counted
when the queue is full. One worker per judge drains it at the judge's rate limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from server.evaluation.judges import (
    Judge,
    JudgeCallError,
    JudgeReplyError,
    PairVerdict,
    Verdict,
    compare,
    judge_one,
)
from server.store import CompletionRecord, FeedbackCreate, JudgeCallRow, Store
from server.telemetry.progress import Progress

log = logging.getLogger(__name__)

# Requests a judge sends carry ``user: judge:<name>``; a completion with such a user is a
# judge's own call (if an endpoint stored it anyway) and is never judged in turn.
JUDGE_USER_PREFIX = "judge:"


def conversation_of(record: CompletionRecord, choice_index: int) -> list[dict[str, str]]:
    """The conversation a choice answered, as ``{role, content}`` messages: a chat request's
    messages as sent (``developer`` read as ``system``); a text completion's prompt as one
    user turn (a request with several prompts: this choice's own)."""
    if record.conversation and isinstance(record.request, list):
        return [
            {
                "role": "system" if m.get("role") == "developer" else str(m.get("role")),
                "content": _text(m.get("content")),
            }
            for m in record.request
        ]
    own = record.choices[choice_index].prompt_text
    if own is None:
        own = record.request if isinstance(record.request, str) else record.prompt_text
    return [{"role": "user", "content": own}]


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def pairs_of(record: CompletionRecord) -> list[tuple[int, int]]:
    """Disjoint pairs of choices answering the same prompt: (0, 1), (2, 3), …"""
    indices = [c.index for c in record.choices]
    pairs = []
    for a, b in zip(indices[0::2], indices[1::2], strict=False):
        if record.prompt_of(a) == record.prompt_of(b):
            pairs.append((a, b))
    return pairs


def judgeable(judge: Judge, record: CompletionRecord) -> bool:
    if record.status != "finished" or (record.user or "").startswith(JUDGE_USER_PREFIX):
        return False
    if record.uses_tools:  # judges read text turns (`CompletionRecord.uses_tools`)
        return False
    if judge.entry.models is not None and record.model not in judge.entry.models:
        return False
    return judge.kind != "pairwise" or bool(pairs_of(record))


@dataclass
class JudgeRunSummary:
    """Counts of one run. ``judged`` = items asked (a choice, or a pair of choices) =
    ``stored`` + ``unparseable`` + ``failed``; a pairwise tie is stored (a judge_calls row,
    no preference) and also counted in ``ties``."""

    judge: str
    completions: int = 0
    judged: int = 0
    stored: int = 0
    unparseable: int = 0
    failed: int = 0
    ties: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    def add(self, other: JudgeRunSummary) -> None:
        for name in ("completions", "judged", "stored", "unparseable", "failed", "ties"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _call_row(
    judge: Judge,
    record: CompletionRecord,
    choice: int,
    verdict: Verdict | PairVerdict,
    source: str,
    other: int | None = None,
) -> JudgeCallRow:
    replies = [verdict.raw_reply] if isinstance(verdict, Verdict) else list(verdict.raw_replies)
    return JudgeCallRow(
        id=f"jc-{uuid.uuid4().hex}",
        created_at=time.time(),
        judge=judge.name,
        kind=judge.kind,
        judge_model=verdict.judge_model,
        prompt_version=verdict.prompt_version,
        completion_id=record.id,
        choice_index=choice,
        other_choice_index=other,
        verdict=verdict.parsed(),
        raw_replies=replies,
        latency_ms=verdict.latency_s * 1000,
        requests=verdict.requests,
        prompt_tokens=verdict.prompt_tokens,
        completion_tokens=verdict.completion_tokens,
        source=source,
    )


async def store_verdict(
    store: Store, judge: Judge, record: CompletionRecord, choice: int, verdict: Verdict, source: str
) -> JudgeCallRow:
    """A judgment/score verdict → feedback (label; the judgment text when something is
    wrong; a score judge's score as the reward) under the judge's key id and annotator,
    with its judge_calls row."""
    entry = judge.entry
    fb = FeedbackCreate(
        completion_id=record.id,
        choice_index=choice,
        judgment=verdict.judgment,
        label=verdict.label,
        # The 1-10 score mapped onto [0, 1], the scale of thumbs, stars and labels, so that
        # a Quark pool mixing a score judge with human ratings compares like with like.
        reward=None if verdict.score is None else (verdict.score - 1) / 9,
        annotator=entry.annotator,
        key_id=entry.stored_key_id,
    )
    call, _ = await store.add_judge_call(_call_row(judge, record, choice, verdict, source), fb)
    if judge.metrics is not None:
        judge.metrics.verdicts.labels(judge=judge.name, verdict=verdict.label).inc()
        if judge.metrics.feedback is not None:
            judge.metrics.feedback.labels(record.model, entry.annotator, verdict.label).inc()
    return call


async def store_pair_verdict(
    store: Store,
    judge: Judge,
    record: CompletionRecord,
    pair: tuple[int, int],
    verdict: PairVerdict,
    source: str,
) -> JudgeCallRow:
    """A pairwise verdict → a preference (the winner ``preferred_over`` the loser, both
    choices of this completion); a tie → no feedback, only its judge_calls row."""
    a, b = pair
    fb = None
    if verdict.outcome != "tie":
        winner, loser = (a, b) if verdict.outcome == "a" else (b, a)
        fb = FeedbackCreate(
            completion_id=record.id,
            choice_index=winner,
            preferred_over=record.id,
            preferred_over_choice=loser,
            annotator=judge.entry.annotator,
            key_id=judge.entry.stored_key_id,
        )
    row = _call_row(judge, record, a, verdict, source, other=b)
    call, _ = await store.add_judge_call(row, fb)
    if judge.metrics is not None:
        judge.metrics.verdicts.labels(judge=judge.name, verdict=verdict.outcome).inc()
        if fb is not None and judge.metrics.feedback is not None:
            judge.metrics.feedback.labels(record.model, judge.entry.annotator, "preferred").inc()
    return call


async def judge_record(
    store: Store, judge: Judge, record: CompletionRecord, source: str
) -> JudgeRunSummary:
    """Judge every choice (or pair of choices) of one stored completion and store what
    parses."""
    summary = JudgeRunSummary(judge=judge.name, completions=1)
    if judge.kind == "pairwise":
        items: Iterable[tuple[int, int | None]] = pairs_of(record)
    else:
        items = [(c.index, None) for c in record.choices]
    for first, second in items:
        summary.judged += 1
        conversation = conversation_of(record, first)
        try:
            if second is None:
                verdict = await judge_one(judge, conversation, record.choices[first].text)
                await store_verdict(store, judge, record, first, verdict, source)
            else:
                pair_verdict = await compare(
                    judge, conversation, record.choices[first].text, record.choices[second].text
                )
                await store_pair_verdict(
                    store, judge, record, (first, second), pair_verdict, source
                )
                summary.ties += pair_verdict.outcome == "tie"
            summary.stored += 1
        except JudgeReplyError as exc:
            summary.unparseable += 1
            log.info(
                "judge %s: unparseable reply on %s choice %d (%s): %r",
                judge.name,
                record.id,
                first,
                exc,
                [r[:200] for r in exc.replies],
            )
        except JudgeCallError as exc:
            summary.failed += 1
            log.warning("judge %s: %s (%s choice %d)", judge.name, exc, record.id, first)
    return summary


async def judge_stored(
    store: Store,
    judge: Judge,
    *,
    model: str | None = None,
    sample: float = 1.0,
    since: float | None = None,
    limit: int | None = None,
    concurrency: int = 4,
    seed: int | None = None,
    show_progress: bool = False,
) -> JudgeRunSummary:
    """``aligngate judge``: the stored completions of ``model`` (since ``since``) that this
    judge has not judged yet, each kept with probability ``sample``, at most ``limit`` of
    them, ``concurrency`` at a time (the judge's rate limit still applies); with
    ``show_progress``, a bar on a terminal, else a progress line every 10 s."""
    started = time.perf_counter()
    before = (judge.requests, judge.prompt_tokens, judge.completion_tokens)
    fetch = limit if sample >= 1 else None
    records = await store.unjudged_completions(
        judge=judge.name, model=model, since=since, limit=fetch
    )
    rng = random.Random(seed)
    chosen = [r for r in records if judgeable(judge, r) and rng.random() < sample]
    if limit is not None:
        chosen = chosen[:limit]
    gate = asyncio.Semaphore(max(1, concurrency))

    progress = (
        Progress(f"judge {judge.name}", len(chosen), unit="completion") if show_progress else None
    )

    async def one(record: CompletionRecord) -> JudgeRunSummary:
        async with gate:
            part = await judge_record(store, judge, record, "cli")
        if progress is not None:
            progress.update()
        return part

    summary = JudgeRunSummary(judge=judge.name)
    try:
        parts = await asyncio.gather(*(one(r) for r in chosen))
    finally:
        if progress is not None:
            progress.close()
    for part in parts:
        summary.add(part)
    summary.requests = judge.requests - before[0]
    summary.prompt_tokens = judge.prompt_tokens - before[1]
    summary.completion_tokens = judge.completion_tokens - before[2]
    summary.seconds = time.perf_counter() - started
    return summary


class JudgeSampler:
    """Judges a fraction of live traffic in the background (judges with ``sample > 0``)."""

    def __init__(self, store: Store, judges: list[Judge], seed: int | None = None):
        self.store = store
        self.judges = [j for j in judges if j.entry.sample > 0]
        self._rng = random.Random(seed)
        self._queues: dict[str, asyncio.Queue[CompletionRecord]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.summaries = {j.name: JudgeRunSummary(judge=j.name) for j in self.judges}

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for judge in self.judges:
            queue: asyncio.Queue[CompletionRecord] = asyncio.Queue(judge.entry.queue_size)
            self._queues[judge.name] = queue
            self._tasks.append(
                asyncio.create_task(self._work(judge, queue), name=f"judge-{judge.name}")
            )

    def completion_recorded(self, record: CompletionRecord) -> None:
        """Called once a completion is committed, from any thread; never blocks."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: shutting down
            loop.call_soon_threadsafe(self._offer, record)

    def _offer(self, record: CompletionRecord) -> None:
        for judge in self.judges:
            if not judgeable(judge, record) or self._rng.random() >= judge.entry.sample:
                continue
            try:
                self._queues[judge.name].put_nowait(record)
            except asyncio.QueueFull:
                if judge.metrics is not None:
                    judge.metrics.dropped.labels(judge=judge.name).inc()
                log.warning("judge %s: queue full, completion %s not judged", judge.name, record.id)

    async def _work(self, judge: Judge, queue: asyncio.Queue[CompletionRecord]) -> None:
        while True:
            record = await queue.get()
            try:
                self.summaries[judge.name].add(
                    await judge_record(self.store, judge, record, "live")
                )
            except asyncio.CancelledError:
                raise
            except Exception:  # a store outage, a bug: log it, keep judging later traffic
                log.exception("judge %s: could not judge %s", judge.name, record.id)
            finally:
                queue.task_done()

    async def stop(self) -> None:
        """Stop the workers; a judgment in flight is abandoned (nothing half-stored: a
        verdict and its feedback commit together)."""
        self._loop = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
