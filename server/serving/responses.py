"""``/v1/responses``: OpenAI's Responses API with text in and text out (no hosted tools).

A request becomes chat messages (``instructions`` first, then ``input``) and goes the chat
route's way: the family's renderer and its control-token guards, the model's sampling
defaults, admission and limits, the store (as endpoint ``responses``: judges and exports
read it as a conversation) and the judges that sample stored traffic.

Owns: the Responses shapes, whole and as the typed stream events the OpenAI SDKs parse
(``response.created`` … ``response.completed``), and reading a stored response back.
Does not know: how prompts are rendered or how the engine runs.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from server.errors import InvalidRequest, NotFound
from server.models.registry import Registry
from server.models.render import RenderError
from server.protocol import (
    ResponseObject,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponsesRequest,
    ResponseUsage,
)
from server.serving.chat import to_messages
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
)
from server.serving.tokenizing import off_loop, text_size
from server.store import CompletionRecord, Store

ENDPOINT = "/v1/responses"
STORED_ENDPOINT = "responses"


def _message_id(response_id: str) -> str:
    return "msg_" + response_id.removeprefix("resp_")


def _status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def _output(response_id: str, text: str, status: str) -> ResponseOutputMessage:
    return ResponseOutputMessage(
        id=_message_id(response_id), status=status, content=[ResponseOutputText(text=text)]
    )


def _response(
    body: ResponsesRequest | None,
    *,
    response_id: str,
    model: str,
    created_at: float,
    status: str,
    output: list[ResponseOutputMessage],
    usage: ResponseUsage | None,
    store: bool,
    metadata: dict[str, str] | None,
) -> ResponseObject:
    return ResponseObject(
        id=response_id,
        created_at=created_at,
        status=status,  # type: ignore[arg-type]
        model=model,
        output=output,
        usage=usage,
        incomplete_details={"reason": "max_output_tokens"} if status == "incomplete" else None,
        instructions=body.instructions if body else None,
        max_output_tokens=body.max_output_tokens if body else None,
        temperature=body.temperature if body else None,
        top_p=body.top_p if body else None,
        store=store,
        metadata=metadata or {},
        user=body.user if body else None,
    )


def _event(kind: str, sequence: int, **fields: Any) -> bytes:
    data = {"type": kind, "sequence_number": sequence, **fields}
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


async def create_response(body: ResponsesRequest, request: Request, registry: Registry) -> Response:
    model = registry.get(body.model)
    ensure_healthy(model)
    messages = body.messages()
    try:
        prompt = await off_loop(
            text_size([m.text() for m in messages]),
            model.renderer.render_chat,
            to_messages(messages),
            quantile=body.quantile,
        )
    except RenderError as exc:
        param = "input" if exc.param == "messages" else exc.param
        raise InvalidRequest(str(exc), param=param) from exc
    max_tokens = resolve_max_tokens(
        body.max_output_tokens,
        len(prompt.token_ids),
        model.max_model_len,
        prompt_param="input",
        default=model.decoding.get("max_tokens"),
    )
    spec = body.sampling_spec(
        max_tokens=max_tokens,
        logprobs=None,
        family=model.renderer.spec,
        defaults=model.decoding.values,
    )
    response_id = new_id("resp").replace("-", "_", 1)  # OpenAI's and vLLM's `resp_…`
    tracker = tracker_for(request, model, ENDPOINT, prompt_tokens=len(prompt.token_ids))
    steps = merged([engine_steps(model, response_id, prompt.token_ids, spec, tracker)])
    created_at = time.time()
    storing = should_store(body.store, model)

    def finished(result: ChoiceResult) -> ResponseObject:
        status = _status(result.finish_reason)
        return _response(
            body,
            response_id=response_id,
            model=model.name,
            created_at=created_at,
            status=status,
            output=[_output(response_id, result.text, status)],
            usage=ResponseUsage(
                input_tokens=len(prompt.token_ids),
                output_tokens=len(result.token_ids),
                total_tokens=len(prompt.token_ids) + len(result.token_ids),
            ),
            store=storing,
            metadata=body.metadata,
        )

    def record(results: list[ChoiceResult]) -> None:
        if storing:
            record_completion(
                request,
                model,
                completion_id=response_id,
                endpoint=STORED_ENDPOINT,
                sent=[m.model_dump(exclude_none=True) for m in messages],
                prompt=prompt,
                spec=spec,
                results=results,
                tracker=tracker,
                user=body.user,
                metadata=body.metadata,
            )

    if body.stream:

        async def events() -> AsyncGenerator[bytes]:
            sequence = iter(range(1 << 62))
            item_id = _message_id(response_id)
            where = {"item_id": item_id, "output_index": 0, "content_index": 0}
            started = _response(
                body,
                response_id=response_id,
                model=model.name,
                created_at=created_at,
                status="in_progress",
                output=[],
                usage=None,
                store=storing,
                metadata=body.metadata,
            ).model_dump(mode="json")
            yield _event("response.created", next(sequence), response=started)
            yield _event("response.in_progress", next(sequence), response=started)
            item = _output(response_id, "", "in_progress").model_dump(mode="json")
            item["content"] = []
            yield _event("response.output_item.added", next(sequence), output_index=0, item=item)
            part = ResponseOutputText(text="").model_dump(mode="json")
            yield _event("response.content_part.added", next(sequence), **where, part=part)
            result = ChoiceResult(index=0)
            async with contextlib.aclosing(steps):
                async for _, deltas in steps:
                    tracker.saw(deltas)
                    for d in deltas:
                        result.add(d)
                        if d.text:
                            yield _event(
                                "response.output_text.delta",
                                next(sequence),
                                **where,
                                delta=d.text,
                                logprobs=[],
                            )
            record([result])
            done = finished(result)
            text = result.text
            yield _event(
                "response.output_text.done", next(sequence), **where, text=text, logprobs=[]
            )
            part = ResponseOutputText(text=text).model_dump(mode="json")
            yield _event("response.content_part.done", next(sequence), **where, part=part)
            item = done.output[0].model_dump(mode="json")
            yield _event("response.output_item.done", next(sequence), output_index=0, item=item)
            kind = "response.completed" if done.status == "completed" else "response.incomplete"
            yield _event(kind, next(sequence), response=done.model_dump(mode="json"))

        return stream_response(sse(events(), tracker), model, tracker)

    try:
        (result,) = await unless_disconnected(request, collect(steps, tracker, 1, 1))
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        tracker.close()
    record([result])
    return Response(
        finished(result).model_dump_json(),
        media_type="application/json",
        headers=response_headers(model, tracker),
    )


def stored_response(record: CompletionRecord) -> ResponseObject:
    """A stored response as it was answered (its request's sampling fields aside)."""
    choice = record.choices[0]
    status = _status(choice.finish_reason)
    return _response(
        None,
        response_id=record.id,
        model=record.model,
        created_at=record.created_at,
        status=status,
        output=[_output(record.id, choice.text, status)],
        usage=ResponseUsage(
            input_tokens=record.prompt_tokens,
            output_tokens=record.completion_tokens,
            total_tokens=record.prompt_tokens + record.completion_tokens,
        ),
        store=True,
        metadata=record.metadata,
    )


async def retrieve_response(store: Store, response_id: str, owner: str | None) -> ResponseObject:
    try:
        record, _ = await store.get_completion(response_id, owner=owner)
    except NotFound:
        record = None
    if record is None or record.endpoint != STORED_ENDPOINT:
        raise NotFound(f"No response found with id '{response_id}'.", param="response_id")
    return stored_response(record)
