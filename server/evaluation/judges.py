"""AI judges: any OpenAI-compatible chat endpoint asked for a verdict on a response.

Owns: the ``Judge`` built from a models-file entry (its prompt, its endpoint and key, its
metrics), the HTTP call (``{url}/chat/completions``, temperature 0, retried with exponential
backoff on 429, 5xx, connection errors and timeouts, a bounded number of attempts), and the
two questions others ask: ``judge_one`` (a judgment or a score of one response) and
``compare`` (A vs B asked in both orders; disagreeing orders are a tie, MT-Bench's rule via
``ratings.combine_both_orders``).
Does not know: the store (``judge_runs`` stores verdicts), the engine (a judge may be this
gateway, but it is reached over HTTP like any other), HTTP routes.

A ``function`` judge is code (``target: "module:callable"``, a verifiable reward as TRL's
``reward_funcs``): it is called in a worker thread instead of an endpoint, and gives the
same verdicts, stored the same way.

Every request sends ``store: false`` and ``user: judge:<name>``, so a gateway judging itself
does not record its judges' prompts as traffic to be judged again.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from server.errors import RateLimited
from server.evaluation.judge_prompts import (
    JudgePrompt,
    JudgeReplyError,
    Side,
    judgment_message,
    pairwise_message,
    parse_judgment,
    parse_pair,
    parse_score,
    reply_pattern,
    unswap,
)
from server.evaluation.ratings import Outcome, combine_both_orders
from server.guards.ratelimit import RateLimiter
from server.metrics import JudgeMetrics
from server.models.models_file import SELF_URL, JudgeEntry, ModelsFileError
from server.telemetry.tracing import current_trace_headers, span

log = logging.getLogger(__name__)

_RETRIED_STATUS = {408, 409, 429, 500, 502, 503, 504}
_BACKOFF_BASE_S = 0.5
_BACKOFF_MAX_S = 30.0

__all__ = [
    "Judge",
    "JudgeCallError",
    "JudgeReplyError",
    "PairVerdict",
    "Verdict",
    "build_judge",
    "compare",
    "judge_one",
]


class JudgeCallError(RuntimeError):
    """The endpoint did not answer usefully (after the retries). ``reason`` labels the metric."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Judge:
    entry: JudgeEntry
    prompt: JudgePrompt
    url: str  # the resolved base URL (…/v1); "" for a function judge
    api_key: str | None
    metrics: JudgeMetrics | None = None
    client: httpx.AsyncClient | None = None  # shared; None: one per call
    # The entry's requests_per_minute, as a token bucket every request waits on.
    limiter: RateLimiter | None = None
    # Everything this judge was asked in this process (the CLI's summary reads it).
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # A function judge's callable (``entry.target``); None: an endpoint judge.
    function: Callable[..., Any] | None = None

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def kind(self) -> str:
        """The verdict it gives: judgment, score or pairwise (a function judge's role)."""
        return self.entry.role

    @property
    def model(self) -> str:
        return self.entry.target or "" if self.function is not None else self.entry.model or ""


def load_function(entry: JudgeEntry) -> Callable[..., Any]:
    """``module:attribute`` → the callable; a target that does not import is a start error."""
    assert entry.target is not None
    module_name, _, attribute = entry.target.partition(":")
    try:
        found: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as exc:
        raise ModelsFileError(f"judge {entry.name!r}: cannot import {entry.target}: {exc}") from exc
    if not callable(found):
        raise ModelsFileError(f"judge {entry.name!r}: {entry.target} is not callable")
    return found  # type: ignore[no-any-return]


def build_judge(
    entry: JudgeEntry,
    *,
    self_url: str | None = None,
    metrics: JudgeMetrics | None = None,
    client: httpx.AsyncClient | None = None,
) -> Judge:
    """``self_url``: what ``url: self`` means here (this gateway's …/v1). The key is read from
    ``api_key_env`` now; a variable named but unset is an error, not a silent anonymous call."""
    if entry.kind == "function":
        return Judge(
            entry=entry,
            prompt=JudgePrompt.load(entry.prompt_file),  # unused: code, not a prompt
            url="",
            api_key=None,
            metrics=metrics,
            function=load_function(entry),
        )
    url = entry.url or ""
    if url == SELF_URL:
        if self_url is None:
            raise ModelsFileError(f"judge {entry.name!r}: `url: self` needs this gateway's address")
        url = self_url
    api_key = None
    if entry.api_key_env is not None:
        api_key = os.environ.get(entry.api_key_env)
        if not api_key:
            raise ModelsFileError(
                f"judge {entry.name!r}: environment variable {entry.api_key_env} is not set"
            )
    try:
        prompt = JudgePrompt.load(entry.prompt_file)
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelsFileError(f"judge {entry.name!r}: {exc}") from exc
    return Judge(
        entry=entry,
        prompt=prompt,
        url=url.rstrip("/"),
        api_key=api_key,
        metrics=metrics,
        client=client,
        limiter=RateLimiter(entry.requests_per_minute, "judge requests"),
    )


async def _wait_for_turn(judge: Judge) -> None:
    while judge.limiter is not None:
        try:
            judge.limiter.check(judge.name)
            return
        except RateLimited as exc:
            await asyncio.sleep(float(exc.headers["retry-after"]))


@dataclass(frozen=True)
class Reply:
    text: str
    latency_s: float  # the successful attempt's
    attempts: int
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Verdict:
    """A judgment or score judge's verdict on one response. ``label``: desirable or not;
    ``judgment``: what is wrong (judgment kind, when something is); ``score``: 1-10 (score
    kind)."""

    judge: str
    kind: str
    judge_model: str
    prompt_version: str
    label: Literal["desirable", "undesirable"]
    judgment: str | None
    score: float | None
    raw_reply: str
    latency_s: float
    requests: int
    prompt_tokens: int
    completion_tokens: int

    def parsed(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label}
        if self.kind == "score":
            out["score"] = self.score
        else:
            out["judgment"] = self.judgment
        return out


@dataclass(frozen=True)
class PairVerdict:
    """A pairwise judge's verdict: ``outcome`` combines ``first`` (A shown first) and
    ``second`` (B shown first, told from A's side): agreeing orders stand, else a tie."""

    judge: str
    judge_model: str
    prompt_version: str
    outcome: Side
    first: Side
    second: Side
    raw_replies: tuple[str, str]
    latency_s: float  # both orders together
    requests: int
    prompt_tokens: int
    completion_tokens: int

    def parsed(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "first": self.first, "second": self.second}


@dataclass
class _Usage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    replies: list[str] = field(default_factory=list)

    def add(self, reply: Reply) -> None:
        self.requests += reply.attempts
        self.prompt_tokens += reply.prompt_tokens
        self.completion_tokens += reply.completion_tokens
        self.latency_s += reply.latency_s
        self.replies.append(reply.text)


async def judge_one(judge: Judge, conversation: list[dict[str, str]], response: str) -> Verdict:
    """Ask a ``judgment`` or ``score`` judge about ``response`` (the assistant's answer to
    ``conversation``, a list of ``{role, content}``). Raises ``JudgeReplyError`` (counted) when
    the reply carries no verdict, ``JudgeCallError`` when the endpoint fails."""
    if judge.kind not in ("judgment", "score"):
        raise ValueError(f"judge {judge.name!r} is {judge.kind}: use compare()")
    if judge.function is not None:
        return await _function_verdict(judge, conversation, response)
    reply = await ask(judge, judgment_message(judge.prompt, conversation, response))
    try:
        if judge.kind == "score":
            score: float | None = parse_score(reply.text)
            assert score is not None
            text = None
            good = score >= judge.entry.threshold
        else:
            parsed = parse_judgment(reply.text)
            score, text, good = None, parsed.text, parsed.good
    except JudgeReplyError as exc:
        _count_error(judge, exc.reason)
        raise
    return Verdict(
        judge=judge.name,
        kind=judge.kind,
        judge_model=judge.model,
        prompt_version=judge.prompt.version,
        label="desirable" if good else "undesirable",
        judgment=text,
        score=score,
        raw_reply=reply.text,
        latency_s=reply.latency_s,
        requests=reply.attempts,
        prompt_tokens=reply.prompt_tokens,
        completion_tokens=reply.completion_tokens,
    )


_OUTCOME_OF_A: dict[str, Outcome] = {"a": "win", "b": "loss", "tie": "tie"}
_SIDE_OF: dict[str, Side] = {"win": "a", "loss": "b", "tie": "tie"}


async def compare(judge: Judge, conversation: list[dict[str, str]], a: str, b: str) -> PairVerdict:
    """Ask a ``pairwise`` judge A vs B and B vs A (the second request shows ``b`` as
    assistant A), both at once. A verdict that flips with the order is a tie. A reply that
    cannot be parsed, in either order, raises ``JudgeReplyError`` carrying both replies
    (counted; nothing is a verdict)."""
    if judge.kind != "pairwise":
        raise ValueError(f"judge {judge.name!r} is {judge.kind}: use judge_one()")
    if judge.function is not None:
        return await _function_pair(judge, conversation, a, b)
    # Both orders at once: one endpoint batches them, and both replies are kept either way.
    replies = await asyncio.gather(
        ask(judge, pairwise_message(judge.prompt, conversation, a, b)),
        ask(judge, pairwise_message(judge.prompt, conversation, b, a)),
    )
    usage = _Usage()
    for reply in replies:
        usage.add(reply)
    sides: list[Side] = []
    for reply, order in zip(replies, ("first", "second"), strict=True):
        try:
            side = parse_pair(reply.text)
        except JudgeReplyError as exc:
            _count_error(judge, exc.reason)
            raise JudgeReplyError(
                f"{exc} ({order} order)", exc.reason, tuple(usage.replies)
            ) from exc
        sides.append(unswap(side) if order == "second" else side)
    first, second = sides
    outcome = _SIDE_OF[combine_both_orders(_OUTCOME_OF_A[first], _OUTCOME_OF_A[second])]
    return PairVerdict(
        judge=judge.name,
        judge_model=judge.model,
        prompt_version=judge.prompt.version,
        outcome=outcome,
        first=first,
        second=second,
        raw_replies=(usage.replies[0], usage.replies[1]),
        latency_s=usage.latency_s,
        requests=usage.requests,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
    )


FUNCTION_VERSION = "function"


async def _call(judge: Judge, *args: Any) -> tuple[Any, float]:
    """The function in a worker thread (user code may block); its result and latency."""
    assert judge.function is not None
    started = time.perf_counter()
    judge.requests += 1
    try:
        with span("judge", aligngate__judge=judge.name, aligngate__judge_kind=judge.kind):
            result = await asyncio.to_thread(judge.function, *args)
    except Exception as exc:  # the code's own failure: an unreadable verdict, counted
        _count_error(judge, "function_error")
        raise JudgeReplyError(f"{judge.entry.target} raised {exc!r}", "function_error", ()) from exc
    elapsed = time.perf_counter() - started
    if judge.metrics is not None:
        judge.metrics.observe_request(judge.name, judge.kind, elapsed)
    return result, elapsed


def _bad(judge: Judge, result: Any, expected: str) -> JudgeReplyError:
    _count_error(judge, "function_result")
    return JudgeReplyError(
        f"{judge.entry.target} returned {result!r}; expected {expected}", "function_result", ()
    )


async def _function_verdict(
    judge: Judge, conversation: list[dict[str, str]], response: str
) -> Verdict:
    result, elapsed = await _call(judge, conversation, response)
    score: float | None = None
    text: str | None = None
    if judge.kind == "score":
        if isinstance(result, bool) or not isinstance(result, int | float):
            raise _bad(judge, result, "a score from 1 to 10")
        if not 1 <= float(result) <= 10:
            raise _bad(judge, result, "a score from 1 to 10")
        score = float(result)
        good = score >= judge.entry.threshold
    else:
        if result is not None and not (isinstance(result, str) and result.strip()):
            raise _bad(judge, result, "a judgment (text) or None for a fine response")
        text, good = result, result is None
    return Verdict(
        judge=judge.name,
        kind=judge.kind,
        judge_model=judge.model,
        prompt_version=FUNCTION_VERSION,
        label="desirable" if good else "undesirable",
        judgment=text,
        score=score,
        raw_reply=repr(result),
        latency_s=elapsed,
        requests=1,
        prompt_tokens=0,
        completion_tokens=0,
    )


async def _function_pair(
    judge: Judge, conversation: list[dict[str, str]], a: str, b: str
) -> PairVerdict:
    """Both orders, as a model judge is asked (code may look at positions too)."""
    (first, t1), (second, t2) = await asyncio.gather(
        _call(judge, conversation, a, b), _call(judge, conversation, b, a)
    )
    for result in (first, second):
        if result not in ("a", "b", "tie"):
            raise _bad(judge, result, '"a", "b" or "tie"')
    second = unswap(second)
    outcome = _SIDE_OF[combine_both_orders(_OUTCOME_OF_A[first], _OUTCOME_OF_A[second])]
    return PairVerdict(
        judge=judge.name,
        judge_model=judge.model,
        prompt_version=FUNCTION_VERSION,
        outcome=outcome,
        first=first,
        second=second,
        raw_replies=(repr(first), repr(second)),
        latency_s=t1 + t2,
        requests=2,
        prompt_tokens=0,
        completion_tokens=0,
    )


async def ask(judge: Judge, message: str) -> Reply:
    """One chat completion of the judge's model on ``message``, retried as the entry says."""
    entry = judge.entry
    body = {
        "model": entry.model,
        "messages": [{"role": "user", "content": message}],
        "temperature": 0,
        "max_tokens": entry.max_tokens,
        "store": False,
        "user": entry.annotator,
    }
    if entry.constrain:
        body["structured_outputs"] = {"regex": reply_pattern(entry.kind, entry.max_tokens)}
    headers = {"authorization": f"Bearer {judge.api_key}"} if judge.api_key else {}
    own = judge.client is None
    client = judge.client or httpx.AsyncClient(timeout=entry.timeout_s)
    try:
        for attempt in range(1, entry.max_attempts + 1):
            await _wait_for_turn(judge)
            judge.requests += 1
            started = time.perf_counter()
            wait: float | None = None
            try:
                with span(
                    "judge",
                    aligngate__judge=judge.name,
                    aligngate__judge_kind=judge.kind,
                    aligngate__attempt=attempt,
                ):
                    # The judge's own request span (this gateway's, or a traced server's)
                    # is this one's child.
                    answer = await client.post(
                        f"{judge.url}/chat/completions",
                        json=body,
                        headers={**headers, **current_trace_headers()},
                        timeout=entry.timeout_s,
                    )
            except httpx.TimeoutException as exc:
                reason, detail = "timeout", str(exc) or "timed out"
            except httpx.TransportError as exc:
                reason, detail = "connection", str(exc) or type(exc).__name__
            else:
                elapsed = time.perf_counter() - started
                if judge.metrics is not None:
                    judge.metrics.observe_request(judge.name, judge.kind, elapsed)
                if answer.status_code == 200:
                    return _reply(judge, answer, elapsed, attempt)
                reason, detail = f"http_{answer.status_code}", answer.text[:300]
                if answer.status_code not in _RETRIED_STATUS:
                    _count_error(judge, reason)
                    raise JudgeCallError(f"judge {judge.name!r}: {detail}", reason)
                wait = _retry_after(answer)
            if judge.metrics is not None and reason in ("timeout", "connection"):
                judge.metrics.observe_request(judge.name, judge.kind, None)
            if attempt == entry.max_attempts:
                _count_error(judge, reason)
                raise JudgeCallError(
                    f"judge {judge.name!r}: {detail} (after {attempt} attempts)", reason
                )
            delay = min(_BACKOFF_MAX_S, _BACKOFF_BASE_S * 2 ** (attempt - 1))
            delay = min(_BACKOFF_MAX_S, max(delay, wait or 0.0))
            log.info("judge %s: %s; retrying in %.1f s", judge.name, reason, delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")
    finally:
        if own:
            await client.aclose()


def _reply(judge: Judge, answer: httpx.Response, elapsed: float, attempts: int) -> Reply:
    try:
        data = answer.json()
        text = data["choices"][0]["message"]["content"]
        if not isinstance(text, str):
            raise TypeError("content is not text")
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        _count_error(judge, "bad_response")
        raise JudgeCallError(
            f"judge {judge.name!r}: not a chat completion ({exc})", "bad_response"
        ) from exc
    usage = data.get("usage") or {}
    reply = Reply(
        text=text,
        latency_s=elapsed,
        attempts=attempts,
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
    )
    judge.prompt_tokens += reply.prompt_tokens
    judge.completion_tokens += reply.completion_tokens
    return reply


def _retry_after(answer: httpx.Response) -> float | None:
    try:
        return float(answer.headers.get("retry-after", ""))
    except ValueError:
        return None


def _count_error(judge: Judge, reason: str) -> None:
    if judge.metrics is not None:
        judge.metrics.errors.labels(judge=judge.name, reason=reason).inc()
