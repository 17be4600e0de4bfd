"""Running one generation against a served model, whole or streamed.

Owns: context-length checks, collecting engine deltas into finished choices, aborting in
the engine when the client goes away, SSE framing, and the per-request metrics.
Does not know: the OpenAI response shapes (``chat`` and ``completions`` build those).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.types import Send

from server.engine.types import ChoiceDelta, PromptLogprobs, Replica, SamplingSpec, TokenLogprob
from server.errors import (
    ContextLengthExceeded,
    EngineFailure,
    EngineUnavailable,
    GatewayError,
    InvalidRequest,
    Overloaded,
    RateLimited,
    error_body,
)
from server.metrics import GatewayMetrics
from server.models.registry import ServedModel
from server.models.render import RenderedPrompt
from server.protocol import Usage
from server.settings import Settings
from server.store import ANONYMOUS_KEY, ChoiceRecord, CompletionRecord, Store
from server.telemetry.tracing import end_span, start_span, trace_headers

log = logging.getLogger(__name__)

T = TypeVar("T")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


TEMPLATE_HEADER = "x-aligngate-template"
REPLICA_HEADER = "x-aligngate-replica"


def template_headers(model: ServedModel) -> dict[str, str]:
    """Every response names the template fingerprint the prompt was rendered with."""
    return {TEMPLATE_HEADER: model.renderer.fingerprint}


def response_headers(model: ServedModel, tracker: Tracker) -> dict[str, str]:
    """The template header, and on a replicated engine (Ray backend) the replica(s) that
    served the request (several prompts of one completions request may go to several)."""
    headers = template_headers(model)
    if tracker.replicas:
        headers[REPLICA_HEADER] = ",".join(tracker.replicas)
    return headers


class _PlacedStreamingResponse(StreamingResponse):
    """A stream whose headers wait for its first chunk, so that they can name the replica
    serving it: that is known once the engine answers, and the first chunk goes out with
    the first token anyway (the chat role chunk too)."""

    def __init__(self, content: AsyncIterator[bytes], headers: Callable[[], dict[str, str]]):
        super().__init__(content, media_type="text/event-stream")
        self._late_headers = headers

    async def stream_response(self, send: Send) -> None:
        chunks = aiter(self.body_iterator)
        first = await anext(chunks, None)
        self.headers.update(self._late_headers())
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        if first is not None:
            await send({"type": "http.response.body", "body": first, "more_body": True})
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def stream_response(
    body: AsyncIterator[bytes], model: ServedModel, tracker: Tracker
) -> StreamingResponse:
    """The SSE response; on a replicated engine its headers name the replica."""
    if getattr(model.engine, "replicated", False):
        return _PlacedStreamingResponse(body, lambda: response_headers(model, tracker))
    return StreamingResponse(body, media_type="text/event-stream", headers=template_headers(model))


def resolve_max_tokens(
    requested: int | None,
    prompt_len: int,
    max_model_len: int,
    *,
    prompt_param: str,
    default: int | None = None,
) -> int:
    """The max_tokens to run with, or a 400 before anything is allocated in the engine.

    Left out, it is the family's default (if any) capped by the room left in the context."""
    if prompt_len >= max_model_len:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {max_model_len} tokens, and the prompt "
            f"has {prompt_len} tokens, which leaves no room for a completion.",
            param=prompt_param,
        )
    if requested is None:
        room = max_model_len - prompt_len
        return min(default, room) if default is not None else room
    if prompt_len + requested > max_model_len:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_len + requested} tokens ({prompt_len} in the prompt, "
            f"{requested} for the completion). Please reduce the prompt or max_tokens.",
            param="max_tokens",
        )
    return requested


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


@dataclass
class ChoiceResult:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = None
    # The answer as the client got it, when tools made it other than the text.
    message: dict[str, Any] | None = None

    def add(self, delta: ChoiceDelta) -> None:
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason


@dataclass
class Tracker:
    """Per-request bookkeeping for metrics: first token, token counts, in-flight gauge."""

    model: str
    endpoint: str
    metrics: GatewayMetrics
    received_at: float
    release: Callable[[], None] = lambda: None  # the engine slot (see ``admission``)
    charge: Callable[[int], None] = lambda tokens: None  # completion tokens, to the key's limit
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None
    closed: bool = False
    # The replicas that took this request's engine calls (Ray backend; none when local).
    replicas: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.metrics.in_flight.labels(self.model).inc()

    def saw(self, deltas: list[ChoiceDelta]) -> None:
        produced = sum(len(d.token_ids) for d in deltas)
        if produced and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
            self.metrics.ttft.labels(self.model, self.endpoint).observe(
                self.first_token_at - self.received_at
            )
        self.completion_tokens += produced

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.release()
        self.charge(self.completion_tokens)
        self.metrics.in_flight.labels(self.model).dec()
        self.metrics.prompt_tokens.labels(self.model).inc(self.prompt_tokens)
        self.metrics.completion_tokens.labels(self.model).inc(self.completion_tokens)


def check_request_rate(request: Request, model: ServedModel) -> None:
    """The key's request limit alone (429 past it), for a model route that generates nothing
    (``/v1/render``): it still renders and tokenizes on the gateway's CPU."""
    key_id = getattr(request.state, "key_id", None) or ANONYMOUS_KEY
    try:
        request.app.state.request_limiter.check(key_id)
    except RateLimited:
        request.app.state.metrics.rejected.labels(model.name, "rate_limited").inc()
        raise


def admission_limit(model: ServedModel, settings: Settings) -> int:
    """Requests in flight on ``model``'s engine before a 429: the entry's (or the setting's)
    ``max_pending_requests`` per engine replica serving it (on a cluster, as many as run)."""
    per_replica = model.entry.max_pending_requests or settings.max_pending_requests
    return per_replica * model.engine.serving_replicas


def tracker_for(request: Request, model: ServedModel, endpoint: str, prompt_tokens: int) -> Tracker:
    """Admit the request — the key's request and token limits, then a slot of its engine
    (429 past any of them) — and start its bookkeeping."""
    request.state.model = model.name
    state = request.app.state
    metrics: GatewayMetrics = state.metrics
    key_id = getattr(request.state, "key_id", None) or ANONYMOUS_KEY
    engine = model.parent or model.name
    limit = admission_limit(model, state.settings)
    try:
        state.request_limiter.check(key_id)
        try:
            state.token_limiter.check(key_id, cost=prompt_tokens)
        except RateLimited:
            state.request_limiter.refund(key_id)
            raise
    except RateLimited:
        metrics.rejected.labels(model.name, "rate_limited").inc()
        raise
    try:
        release = state.admission.admit(engine, limit)
    except Overloaded:
        # A request the gateway had no room for does not count against its key.
        state.request_limiter.refund(key_id)
        state.token_limiter.refund(key_id, prompt_tokens)
        metrics.rejected.labels(model.name, "overloaded").inc()
        raise
    received_at = getattr(request.state, "received_at", time.perf_counter())
    tracker = Tracker(
        model.name,
        endpoint,
        metrics,
        received_at,
        release,
        lambda tokens: state.token_limiter.charge(key_id, tokens),
        prompt_tokens=prompt_tokens,
    )
    request.state.tracker = tracker  # closed by the metrics middleware if nothing else did
    return tracker


def should_store(requested: bool | None, model: ServedModel) -> bool:
    return model.entry.store if requested is None else requested


def record_completion(
    request: Request,
    model: ServedModel,
    *,
    completion_id: str,
    endpoint: str,
    sent: Any,
    prompt: RenderedPrompt,
    spec: SamplingSpec,
    results: list[ChoiceResult],
    tracker: Tracker,
    user: str | None,
    choice_prompts: list[RenderedPrompt] | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Queue the completion for the store; never delays or fails the response."""
    store: Store | None = getattr(request.app.state, "store", None)
    if store is None:
        return
    try:
        record = CompletionRecord(
            id=completion_id,
            created_at=time.time(),
            endpoint=endpoint,
            model=model.name,
            family=model.renderer.family,
            template_fingerprint=model.renderer.fingerprint,
            request=sent,
            prompt_text=prompt.text,
            prompt_token_ids=list(prompt.token_ids),
            prompt_bos=_bos_before_text(model, prompt),
            sampling=dataclasses.asdict(spec),
            choices=[
                ChoiceRecord(
                    r.index,
                    r.text,
                    r.finish_reason,
                    choice_prompts[r.index].text if choice_prompts else None,
                    # Token-exact: what trainers use instead of re-tokenizing the text.
                    token_ids=list(r.token_ids),
                    prompt_token_ids=list(choice_prompts[r.index].token_ids)
                    if choice_prompts
                    else None,
                    message=r.message,
                )
                for r in results
            ],
            prompt_tokens=tracker.prompt_tokens,
            completion_tokens=sum(len(r.token_ids) for r in results),
            latency_ms=(time.perf_counter() - tracker.received_at) * 1000,
            key_id=getattr(request.state, "key_id", None),
            user=user,
            metadata=metadata,
            request_id=getattr(request.state, "request_id", None),
        )
        store_span = start_span("store", aligngate__completion_id=completion_id)
        try:
            future = store.record_completion(record)
        except Exception as exc:
            end_span(store_span, exc)
            raise
        future.add_done_callback(lambda done: end_span(store_span, done.exception()))
        # Whoever listens (the AI judges' sampler) hears of the record once it is committed;
        # the listener only hands it over, so the response is not delayed.
        listener = getattr(request.app.state, "completion_listener", None)
        if listener is not None:
            future.add_done_callback(
                lambda done: listener(record) if done.exception() is None else None
            )
    except Exception:
        log.exception("Could not queue completion %s for the store", completion_id)
        tracker.metrics.store_errors.inc()


def _bos_before_text(model: ServedModel, prompt: RenderedPrompt) -> str | None:
    """The BOS token's text if the engine got a BOS id that ``prompt.text`` lacks."""
    tok = model.renderer.tokenizer
    bos, text = tok.bos_token_id, tok.bos_token
    if bos is None or not text or prompt.token_ids[:1] != [bos] or prompt.text.startswith(text):
        return None
    return str(text)


def ensure_healthy(model: ServedModel) -> None:
    if not model.engine.healthy:
        raise EngineUnavailable(f"The engine of model `{model.name}` is not running.")


async def engine_steps(
    model: ServedModel,
    request_id: str,
    prompt_ids: list[int],
    spec: SamplingSpec,
    tracker: Tracker | None = None,
) -> AsyncIterator[list[ChoiceDelta]]:
    """The engine's deltas, with engine failures turned into gateway errors. On a
    replicated engine the ``tracker`` learns the replica, counted per replica in metrics."""
    ensure_healthy(model)
    engine_name = model.parent or model.name
    replica: Replica | None = None
    outcome = "cancelled"
    # Not current while suspended at `yield` (the consumer's own spans are not its children):
    # vLLM's span is its child through the trace headers.
    engine_span = start_span(
        "engine",
        gen_ai__request__model=model.name,
        aligngate__engine=engine_name,
        aligngate__adapter=model.adapter.name if model.adapter is not None else None,
        aligngate__engine_request_id=request_id,
        gen_ai__usage__input_tokens=len(prompt_ids),
    )
    failure: BaseException | None = None

    def placed(where: Replica) -> None:
        nonlocal replica
        replica = where
        if tracker is not None:
            if where.id not in tracker.replicas:
                tracker.replicas.append(where.id)
            queue = {"running": where.running, "waiting": where.waiting}
            tracker.metrics.replica_started(
                engine_name, where.id, {**queue, "unfinished": where.unfinished}
            )

    try:
        async for deltas in model.engine.generate(
            request_id,
            prompt_ids,
            spec,
            adapter=model.adapter,
            on_replica=placed,
            trace_headers=trace_headers(engine_span),
        ):
            yield deltas
        outcome = "ok"
    except GatewayError as exc:
        outcome, failure = "error", exc
        raise
    except (asyncio.CancelledError, GeneratorExit):
        raise
    except ValueError as exc:
        outcome, failure = "error", exc
        # vLLM validates a request's input and parameters with ValueError: the request's
        # fault, so a 400 — unless the engine itself is gone.
        if not model.engine.healthy:
            raise EngineUnavailable(f"The engine of model `{model.name}` stopped.") from exc
        raise InvalidRequest(f"The engine refused the request: {exc}") from exc
    except Exception as exc:
        outcome, failure = "error", exc
        if not model.engine.healthy:
            raise EngineUnavailable(f"The engine of model `{model.name}` stopped.") from exc
        log.exception("Generation %s failed", request_id)
        raise EngineFailure("The engine failed to generate a response.") from exc
    finally:
        if replica is not None and tracker is not None:
            tracker.metrics.replica_finished(engine_name, replica.id, outcome)
        engine_span.set_attribute("aligngate.outcome", outcome)
        if replica is not None:
            engine_span.set_attribute("aligngate.replica", replica.id)
        end_span(engine_span, failure)


async def merged(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several async iterators as they come, tagged with the iterator's index."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:  # type: ignore[type-var]
            async for item in only:
                yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((i, item))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            await queue.put((i, exc))
            return
        await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect(
    steps: AsyncIterator[tuple[int, list[ChoiceDelta]]], tracker: Tracker, n: int, prompts: int
) -> list[ChoiceResult]:
    """Drain all engine steps into finished choices, indexed prompt * n + choice."""
    results = [ChoiceResult(index=i) for i in range(prompts * n)]
    async for prompt_index, deltas in steps:
        tracker.saw(deltas)
        for delta in deltas:
            results[prompt_index * n + delta.index].add(delta)
    return results


class ClientDisconnected(Exception):
    pass


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run ``work``; if the client disconnects first, cancel it (the engine aborts) and
    raise ClientDisconnected."""
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.create_task(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch_task
    if not work_task.done():
        work_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work_task
        raise ClientDisconnected()
    return work_task.result()


async def sse(events: AsyncGenerator[BaseModel | bytes], tracker: Tracker) -> AsyncIterator[bytes]:
    """Frame events as server-sent events ending in ``data: [DONE]`` (an event may come framed
    already, see ``stream_frames``); an error after the stream started becomes an SSE error
    event (the status line is already sent)."""
    try:
        async for event in events:
            if isinstance(event, bytes):
                yield event
            else:
                yield b"data: " + event.model_dump_json().encode() + b"\n\n"
    except GatewayError as exc:
        yield b"data: " + json.dumps(exc.to_dict()).encode() + b"\n\n"
    except Exception:
        log.exception("Stream failed")
        body = error_body("Internal server error.", "server_error", code="internal_error")
        yield b"data: " + json.dumps(body).encode() + b"\n\n"
    finally:
        # Closing the event source closes the engine stream, which aborts an unfinished
        # request (the client is gone when we get here early).
        await events.aclose()
        tracker.close()
    yield b"data: [DONE]\n\n"
