"""The promotion gate: a new checkpoint replaces the promoted one only when it wins.

The candidate and the version the alias serves now answer the same fixed instructions (an
AlpacaEval slice by default) through their own renderers and engines, greedily; a pairwise
judge compares each pair in both orders (a verdict that flips with the order is a tie); the
decision is ``gate_rule.decide``'s: by default the candidate must be better (superiority:
the one-sided 95 % lower bound of its win rate, ties half, above 0.5), and the gate does not
decide when too many verdicts were unreadable or flipped with the order.

The incumbent's answers are remembered (``IncumbentAnswers``): an incumbent that was not
replaced answers the same instructions greedily again in the next iteration, so only the
candidate generates. The report keeps every answer (``outputs``, alpaca_eval's
``model_outputs`` with the verdict), for the audit and for measuring either side.

Owns: generating both sides, judging them, the report. Does not know: HTTP, the store,
how a judge is reached (``compare`` is given).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from server.evaluation.batch import Item, batch_spec, engine_generator, load_instructions
from server.evaluation.gate_rule import GateRule, decide
from server.evaluation.length_control import length_controlled
from server.evaluation.ratings import Outcome
from server.models.registry import ServedModel

log = logging.getLogger(__name__)

JUDGE_CONCURRENCY = 4


class PairOutcome(Protocol):
    """What a pairwise judge returns for one pair asked in both orders."""

    outcome: str  # "a" | "b" | "tie"
    first: str  # the verdict with A shown first ("a" | "b" | "tie")
    second: str  # with B shown first, told from A's side
    requests: int
    prompt_tokens: int
    completion_tokens: int


Compare = Callable[[list[dict[str, str]], str, str], Awaitable[PairOutcome]]


# ``gate_rule.required_items()``: ≥ 80 % power at a true win rate of 0.60 with 30 % ties
# (a test checks the two agree).
DEFAULT_SIZE = 116


@dataclass(frozen=True)
class GateSettings:
    size: int = DEFAULT_SIZE  # instructions
    max_tokens: int = 256  # per answer
    rule: GateRule = field(default_factory=GateRule)
    eval_file: Path | None = None  # None: the official AlpacaEval set
    # Instructions chosen by the caller (held-out traffic); None: ``eval_file``'s slice.
    items: list[Item] | None = None
    eval_source: str = ""  # what the instructions are, for the report
    warnings: tuple[str, ...] = ()


def evaluation_slice(items: list[Item], size: int) -> list[Item]:
    """``size`` instructions spread evenly over the set (AlpacaEval's five source datasets
    come in blocks, so the first N would be one dataset)."""
    if size >= len(items):
        return items
    step = len(items) / size
    return [items[int(i * step)] for i in range(size)]


Run = tuple[str, str | None, int]  # an answer: text, finish reason, tokens


class IncumbentAnswers:
    """The incumbent's greedy answers per (served version, instructions, ``max_tokens``): a
    small LRU. The served object's identity is in the key, so a name loaded again with
    other weights is a new entry."""

    def __init__(self, capacity: int = 4) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[tuple[object, ...], list[Run]] = OrderedDict()
        self.hits = 0

    @staticmethod
    def key(model: ServedModel, items: list[Item], max_tokens: int) -> tuple[object, ...]:
        adapter = model.adapter.path if model.adapter is not None else model.path
        instructions = tuple(item.instruction for item in items)
        return (model.name, id(model), model.created, adapter, max_tokens, instructions)

    def get(self, key: tuple[object, ...]) -> list[Run] | None:
        runs = self._entries.get(key)
        if runs is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        return runs

    def put(self, key: tuple[object, ...], runs: list[Run]) -> None:
        self._entries[key] = runs
        self._entries.move_to_end(key)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)


# The report with every answer, written beside a candidate adapter (``public(outputs=True)``).
GATE_FILE = "gate.json"
# One per process: every gate of this front end shares it.
INCUMBENT_ANSWERS = IncumbentAnswers()


@dataclass
class GateReport:
    candidate: str
    incumbent: str
    judge: str
    items: int = 0
    # Where the instructions came from (held-out traffic, a file, AlpacaEval) and any
    # warning about them (AlpacaEval: the set overlaps the benchmark users report).
    eval_source: str = ""
    warnings: list[str] = field(default_factory=list)
    judged: int = 0
    unparseable: int = 0  # pairs the judge's replies could not be read for: not counted
    flips: int = 0  # judged pairs whose verdict changed with the order (counted as ties)
    # Answer lengths (tokens), the best-known bias of LLM judges: each side's mean, and how
    # many answers were cut by max_tokens.
    candidate_mean_tokens: float = 0.0
    incumbent_mean_tokens: float = 0.0
    candidate_truncated: int = 0
    incumbent_truncated: int = 0
    # The win rate at equal lengths (alpaca_eval's GLM, ``length_control``), beside the raw
    # one; with ``length_controlled`` the decision rests on its lower bound.
    lc_win_rate: float = 0.5
    lc_lower_bound: float = 0.0
    length_coefficient: float = 0.0
    wins: int = 0
    losses: int = 0
    ties: int = 0
    win_rate: float = 0.0
    lower_bound: float = 0.0  # one-sided, 95 %
    p_value: float = 1.0
    mode: str = "superiority"
    decided: bool = True  # False: too many unreadable or flipped verdicts to decide
    promoted: bool = False
    reason: str = ""
    requests: int = 0  # the judge's cost
    prompt_tokens: int = 0
    completion_tokens: int = 0
    incumbent_cached: bool = False  # the incumbent's answers came from an earlier gate
    timings: dict[str, float] = field(default_factory=dict)
    # Each judged pair, for the leaderboard: the conversation and the winner (a: candidate).
    battles: list[dict[str, Any]] = field(default_factory=list)
    # Every item: the instruction, both answers, their finish reasons and token counts, and
    # the verdict ("a": the candidate; None: not judged).
    outputs: list[dict[str, Any]] = field(default_factory=list)

    def public(self, *, outputs: bool = False) -> dict[str, Any]:
        values = asdict(self)
        values.pop("battles")
        if not outputs:
            values.pop("outputs")
        return values


async def run_gate(
    candidate: ServedModel,
    incumbent: ServedModel,
    judge_name: str,
    compare: Compare,
    settings: GateSettings,
    incumbent_answers: IncumbentAnswers | None = INCUMBENT_ANSWERS,
) -> GateReport:
    report = GateReport(
        candidate=candidate.name,
        incumbent=incumbent.name,
        judge=judge_name,
        eval_source=settings.eval_source,
        warnings=list(settings.warnings),
    )
    if settings.items is not None:
        items = settings.items[: settings.size]
    else:
        items = evaluation_slice(
            await asyncio.to_thread(load_instructions, settings.eval_file), settings.size
        )
    report.items = len(items)

    started = time.perf_counter()

    async def answers(model: ServedModel) -> list[Run]:
        generate = engine_generator(
            model, batch_spec(model, max_tokens=settings.max_tokens, temperature=0.0)
        )
        return list(await asyncio.gather(*(generate(item) for item in items)))

    async def incumbent_runs() -> list[Run]:
        if incumbent_answers is None:
            return await answers(incumbent)
        key = incumbent_answers.key(incumbent, items, settings.max_tokens)
        cached = incumbent_answers.get(key)
        if cached is not None:
            report.incumbent_cached = True
            return cached
        runs = await answers(incumbent)
        incumbent_answers.put(key, runs)
        return runs

    # Both sides at once: one engine batches them (an adapter shares its base's engine).
    our_runs, their_runs = await asyncio.gather(answers(candidate), incumbent_runs())
    ours = [text.strip() for text, _, _ in our_runs]
    theirs = [text.strip() for text, _, _ in their_runs]
    if items:
        report.candidate_mean_tokens = round(sum(t for *_, t in our_runs) / len(items), 1)
        report.incumbent_mean_tokens = round(sum(t for *_, t in their_runs) / len(items), 1)
    report.candidate_truncated = sum(reason == "length" for _, reason, _ in our_runs)
    report.incumbent_truncated = sum(reason == "length" for _, reason, _ in their_runs)
    report.timings["generate_s"] = round(time.perf_counter() - started, 3)

    started = time.perf_counter()
    limit = asyncio.Semaphore(JUDGE_CONCURRENCY)
    outcomes: list[Outcome] = []
    # Per judged item: (the candidate's score, its answer's tokens, the incumbent's).
    scored: list[tuple[float, int, int]] = []
    lengths = {
        item.index: (ours_run[2], theirs_run[2])
        for item, ours_run, theirs_run in zip(items, our_runs, their_runs, strict=True)
    }

    verdicts: dict[int, str] = {}

    async def judge(item: Item, a: str, b: str) -> None:
        conversation = [{"role": "user", "content": item.instruction}]
        async with limit:
            try:
                verdict = await compare(conversation, a, b)
            except Exception as exc:  # an unreadable reply, or a judge that failed
                report.unparseable += 1
                log.info("Gate pair %d not judged: %s", item.index, exc)
                return
        report.requests += verdict.requests
        report.prompt_tokens += verdict.prompt_tokens
        report.completion_tokens += verdict.completion_tokens
        outcomes.append({"a": "win", "b": "loss"}.get(verdict.outcome, "tie"))  # type: ignore[arg-type]
        report.flips += verdict.first != verdict.second
        score = {"a": 1.0, "b": 0.0}.get(verdict.outcome, 0.5)
        scored.append((score, *lengths[item.index]))
        report.battles.append({"messages": conversation, "winner": verdict.outcome})
        verdicts[item.index] = verdict.outcome

    await asyncio.gather(*(judge(i, a, b) for i, a, b in zip(items, ours, theirs, strict=True)))
    report.outputs = [
        {
            "instruction": item.instruction,
            "candidate": text,
            "candidate_finish": ours_run[1],
            "candidate_tokens": ours_run[2],
            "incumbent": their_text,
            "incumbent_finish": theirs_run[1],
            "incumbent_tokens": theirs_run[2],
            "winner": verdicts.get(item.index),
        }
        for item, text, their_text, ours_run, theirs_run in zip(
            items, ours, theirs, our_runs, their_runs, strict=True
        )
    ]
    report.timings["judge_s"] = round(time.perf_counter() - started, 3)

    decision = decide(
        outcomes.count("win"),
        outcomes.count("loss"),
        outcomes.count("tie"),
        settings.rule,
        unreadable=report.unparseable,
        flips=report.flips,
    )
    report.judged = len(outcomes)
    report.wins, report.losses, report.ties = decision.wins, decision.losses, decision.ties
    report.win_rate, report.lower_bound = decision.win_rate, decision.lower_bound
    report.p_value, report.mode, report.decided = decision.p_value, decision.mode, decision.decided
    report.promoted, report.reason = decision.promoted, decision.reason
    if scored:
        lc = await asyncio.to_thread(
            length_controlled,
            [s for s, _, _ in scored],
            [c for _, c, _ in scored],
            [i for _, _, i in scored],
            confidence=settings.rule.confidence,
        )
        report.lc_win_rate, report.lc_lower_bound = lc.win_rate, lc.lower_bound
        report.length_coefficient = lc.length_coefficient
    if settings.rule.length_controlled and decision.decided and decision.n:
        report.promoted = report.lc_lower_bound > settings.rule.threshold
        report.reason = (
            f"length-controlled win rate {report.lc_win_rate:.3f}, lower bound "
            f"{report.lc_lower_bound:.3f} {'above' if report.promoted else 'not above'} "
            f"{settings.rule.threshold:.2f} (raw: {decision.reason})"
        )
    return report
