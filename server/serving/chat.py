"""``/v1/chat/completions``: messages in, a chat completion (or its SSE chunks) out.

Owns: the chat response shapes built from engine results.
Does not know: how prompts are rendered (``render``) or how the engine runs (``engine``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import AsyncGenerator

from fastapi import Request
from fastapi.responses import Response

from server.engine.tool_parsing import ParsedDelta, ToolCallReader
from server.engine.types import ChoiceDelta, TokenLogprob
from server.errors import InvalidRequest
from server.models.registry import Registry
from server.models.render import Message, RenderError
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    ChatTokenLogprob,
    TopLogprobOut,
    Usage,
)
from server.serving.generation import (
    ChoiceResult,
    ClientDisconnected,
    collect,
    engine_steps,
    ensure_healthy,
    merged,
    new_id,
    record_completion,
    resolve_max_tokens,
    response_headers,
    should_store,
    sse,
    stream_response,
    tracker_for,
    unless_disconnected,
    usage,
)
from server.serving.prompt_scores import prompt_logprobs_out
from server.serving.stream_frames import StreamFrames, chat_text_choice
from server.serving.tokenizing import off_loop, text_size
from server.serving.tool_calls import (
    StreamedMessage,
    ToolPlan,
    assistant_message,
    delta_of,
    stored_message,
    tool_plan,
)

ENDPOINT = "/v1/chat/completions"


def _tool_chunk_choice(
    tools: ToolPlan,
    reader: ToolCallReader,
    streamed: StreamedMessage,
    d: ChoiceDelta,
    with_ids: bool,
) -> ChatChunkChoice | None:
    """A streamed step of a request with tools: the reader's content and call pieces (at
    the end, what it held back), and the finish reason tool calls give."""
    parsed = reader.step(d.text, d.token_ids) or ParsedDelta(None)
    if d.finish_reason is not None:
        tail = reader.finish()
        if tail is not None:
            parsed = ParsedDelta(
                (parsed.content or "") + (tail.content or "") or None,
                parsed.tool_calls + tail.tool_calls,
            )
    streamed.add(parsed)
    if not (parsed.content or parsed.tool_calls or d.finish_reason or d.logprobs or with_ids):
        return None  # the parser holds this text back (a call may be starting)
    return ChatChunkChoice(
        index=d.index,
        delta=delta_of(parsed),
        logprobs=chat_logprobs(d.logprobs),
        finish_reason=tools.finish_reason(d.finish_reason, reader.streamed_calls())
        if d.finish_reason is not None
        else None,
        token_ids=list(d.token_ids) if with_ids else None,
    )


def chat_logprobs(items: list[TokenLogprob] | None) -> ChatLogprobs | None:
    if items is None:
        return None
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=lp.token,
                logprob=lp.logprob,
                bytes=list(lp.token.encode()),
                top_logprobs=[
                    TopLogprobOut(token=t.token, logprob=t.logprob, bytes=list(t.token.encode()))
                    for t in lp.top
                ],
            )
            for lp in items
        ]
    )


def to_messages(messages: list[ChatMessage]) -> list[Message]:
    # OpenAI's "developer" role is the newer name of "system".
    return [
        Message(
            role="system" if m.role == "developer" else m.role,
            content=m.text(),
            tool_calls=tuple(c.model_dump() for c in m.tool_calls) if m.tool_calls else None,
            tool_call_id=m.tool_call_id,
        )
        for m in messages
    ]


async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, registry: Registry
) -> Response:
    model = registry.get(body.model)
    ensure_healthy(model)
    tools = tool_plan(body, model)
    try:
        prompt = await off_loop(
            text_size(body.model_dump(include={"messages", "tools"})),
            model.renderer.render_chat,
            to_messages(body.messages),
            quantile=body.quantile,
            template_kwargs=body.chat_template_kwargs,
            generation_prompt=body.add_generation_prompt,
            continue_final=body.continue_final_message,
            tools=tools.tools if tools else None,
        )
    except RenderError as exc:
        raise InvalidRequest(str(exc), param=exc.param) from exc
    family = model.renderer.spec
    max_tokens = resolve_max_tokens(
        body.requested_max_tokens(),
        len(prompt.token_ids),
        model.max_model_len,
        prompt_param="messages",
        default=model.decoding.get("max_tokens"),
    )
    spec = dataclasses.replace(
        body.sampling_spec(
            max_tokens=max_tokens,
            logprobs=body.engine_logprobs(),
            family=family,
            defaults=model.decoding.values,
        ),
        prompt_logprobs=body.prompt_logprobs,
    )
    if tools is not None:
        spec = dataclasses.replace(
            spec,
            structured=tools.structured(spec.structured),
            skip_special_tokens=spec.skip_special_tokens and not tools.keeps_special_tokens(),
        )
    request_id = new_id("chatcmpl")
    tracker = tracker_for(request, model, ENDPOINT, prompt_tokens=len(prompt.token_ids))
    steps = merged([engine_steps(model, request_id, prompt.token_ids, spec, tracker)])
    created = int(time.time())
    storing = should_store(body.store, model)
    with_ids = body.return_token_ids

    def record(results: list[ChoiceResult]) -> None:
        if storing:
            record_completion(
                request,
                model,
                completion_id=request_id,
                endpoint="chat",
                sent=[m.model_dump(exclude_none=True) for m in body.messages],
                prompt=prompt,
                spec=spec,
                results=results,
                tracker=tracker,
                user=body.user,
                metadata=body.metadata,
            )

    if body.stream:
        include_usage = body.include_usage()

        async def chunks() -> AsyncGenerator[ChatCompletionChunk | bytes]:
            def chunk(
                choices: list[ChatChunkChoice],
                totals: Usage | None = None,
                prompt_token_ids: list[int] | None = None,
            ) -> ChatCompletionChunk:
                return ChatCompletionChunk(
                    id=request_id,
                    created=created,
                    model=model.name,
                    choices=choices,
                    usage=totals,
                    prompt_token_ids=prompt_token_ids,
                )

            frames = StreamFrames(chunk([]))
            results = [ChoiceResult(index=i) for i in range(body.n)]
            readers = [tools.reader() for _ in range(body.n)] if tools else []
            streamed = [StreamedMessage() for _ in readers]
            announced = False
            async with contextlib.aclosing(steps):
                async for _, deltas in steps:
                    tracker.saw(deltas)
                    if not announced:
                        # The role chunk goes out with the engine's first output, as vLLM's
                        # does: a client timing its first chunk then times the first token.
                        announced = True
                        yield chunk(
                            [
                                ChatChunkChoice(
                                    index=i, delta=ChatDelta(role="assistant", content="")
                                )
                                for i in range(body.n)
                            ],
                            prompt_token_ids=prompt.token_ids if with_ids else None,
                        )
                    for d in deltas:
                        results[d.index].add(d)
                    moved = [
                        d
                        for d in deltas
                        if d.text or d.finish_reason or d.logprobs or (with_ids and d.token_ids)
                    ]
                    if not moved:
                        continue
                    if tools is not None:
                        tool_choices = [
                            _tool_chunk_choice(
                                tools, readers[d.index], streamed[d.index], d, with_ids
                            )
                            for d in moved
                        ]
                        sent = [c for c in tool_choices if c is not None]
                        for c in sent:
                            if c.finish_reason is not None:  # stored as the client saw it
                                results[c.index].finish_reason = c.finish_reason
                        if sent:
                            yield chunk(sent)
                        continue
                    if with_ids or any(d.logprobs for d in moved):
                        yield chunk(
                            [
                                ChatChunkChoice(
                                    index=d.index,
                                    delta=ChatDelta(content=d.text),
                                    logprobs=chat_logprobs(d.logprobs),
                                    finish_reason=d.finish_reason,
                                    token_ids=list(d.token_ids) if with_ids else None,
                                )
                                for d in moved
                            ]
                        )
                    else:  # the per-token hot path: text only, envelope serialized once
                        yield frames.frame(
                            [chat_text_choice(d.index, d.text, d.finish_reason) for d in moved]
                        )
            for r, message in zip(results, streamed, strict=False):
                r.message = message.stored()
            record(results)
            if include_usage:
                yield chunk([], usage(tracker.prompt_tokens, tracker.completion_tokens))

        return stream_response(sse(chunks(), tracker), model, tracker)

    try:
        results = await unless_disconnected(request, collect(steps, tracker, body.n, 1))
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        tracker.close()
    messages = [
        assistant_message(tools.reader().whole(r.text))
        if tools is not None
        else AssistantMessage(content=r.text)
        for r in results
    ]
    if tools is not None:
        for r, message in zip(results, messages, strict=True):
            r.message = stored_message(message)
            r.finish_reason = tools.finish_reason(r.finish_reason, bool(message.tool_calls))
    record(results)
    completion_tokens = sum(len(r.token_ids) for r in results)
    return Response(
        ChatCompletion(
            id=request_id,
            created=created,
            model=model.name,
            choices=[
                ChatChoice(
                    index=r.index,
                    message=message,
                    logprobs=chat_logprobs(r.logprobs),
                    finish_reason=r.finish_reason,
                    token_ids=r.token_ids if with_ids else None,
                )
                for r, message in zip(results, messages, strict=True)
            ],
            usage=usage(len(prompt.token_ids), completion_tokens),
            prompt_logprobs=(
                prompt_logprobs_out(
                    next((r.prompt_logprobs for r in results if r.prompt_logprobs), None)
                )
                if body.prompt_logprobs is not None
                else None
            ),
            prompt_token_ids=prompt.token_ids if with_ids else None,
        ).model_dump_json(),
        media_type="application/json",
        headers=response_headers(model, tracker),
    )
