"""``/v1/completions``: raw prompts in (text or token ids, one or many), text out.

Owns: the text-completion response shapes built from engine results.
Does not know: how prompts are tokenized (``render``) or how the engine runs (``engine``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import AsyncGenerator

from fastapi import Request
from fastapi.responses import Response

from server.engine.types import PromptLogprobs, TokenLogprob
from server.errors import EngineFailure, InvalidRequest
from server.models.registry import Registry, ServedModel
from server.models.render import RenderedPrompt, RenderError
from server.protocol import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest
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
from server.serving.prompt_scores import echoed_logprobs, prompt_logprobs_out
from server.serving.stream_frames import StreamFrames, completion_text_choice
from server.serving.tokenizing import off_loop, text_size

ENDPOINT = "/v1/completions"
MAX_PROMPTS = 64


def completion_logprobs(
    items: list[TokenLogprob] | None, offset: int, echoed: CompletionLogprobs | None = None
) -> CompletionLogprobs | None:
    """OpenAI's ``logprobs`` of a choice: the echoed prompt's (``echoed``), then the
    generated tokens', offsets counted from ``offset``."""
    if items is None:
        return echoed
    out = echoed.model_copy(deep=True) if echoed is not None else CompletionLogprobs()
    if echoed is not None and echoed.tokens:
        offset = echoed.text_offset[-1] + len(echoed.tokens[-1])
    for lp in items:
        out.tokens.append(lp.token)
        out.token_logprobs.append(lp.logprob)
        out.top_logprobs.append({t.token: t.logprob for t in lp.top})
        out.text_offset.append(offset)
        offset += len(lp.token)
    return out


def _prompts(body: CompletionRequest, model: ServedModel) -> list[RenderedPrompt]:
    raw = body.prompt
    items: list[str | list[int]]
    if isinstance(raw, str):
        items = [raw]
    elif all(isinstance(p, int) for p in raw):
        items = [raw]  # type: ignore[list-item]  # one prompt given as token ids
    else:
        items = list(raw)  # type: ignore[arg-type]
    if len(items) > MAX_PROMPTS:
        raise InvalidRequest(f"at most {MAX_PROMPTS} prompts per request", param="prompt")
    try:
        prompts = [
            model.renderer.render_text(p, quantile=body.quantile)
            if isinstance(p, str)
            else model.renderer.render_ids(p)
            for p in items
        ]
    except RenderError as exc:
        raise InvalidRequest(str(exc), param=exc.param) from exc
    # An empty string renders to no token at all for a model without BOS; vLLM refuses it.
    if any(not p.token_ids for p in prompts):
        raise InvalidRequest("prompt renders to no tokens; give some text", param="prompt")
    return prompts


async def create_completion(
    body: CompletionRequest, request: Request, registry: Registry
) -> Response:
    model = registry.get(body.model)
    ensure_healthy(model)
    prompts = await off_loop(text_size(body.prompt), _prompts, body, model)  # long: off the loop
    longest = max(len(p.token_ids) for p in prompts)
    family = model.renderer.spec
    # max_tokens 0 (with echo): the engine scores the prompt and samples one token, which
    # the answer leaves out, as vLLM's server does.
    scoring_only = body.max_tokens == 0
    max_tokens = resolve_max_tokens(
        1 if scoring_only else body.max_tokens,
        longest,
        model.max_model_len,
        prompt_param="prompt",
        default=model.decoding.get("max_tokens"),
    )
    spec = dataclasses.replace(
        body.sampling_spec(
            max_tokens=max_tokens,
            logprobs=body.logprobs,
            family=family,
            defaults=model.decoding.values,
        ),
        prompt_logprobs=body.engine_prompt_logprobs(),
    )
    request_id = new_id("cmpl")
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    tracker = tracker_for(request, model, ENDPOINT, prompt_tokens=prompt_tokens)
    steps = merged(
        [
            engine_steps(model, f"{request_id}-{i}", p.token_ids, spec, tracker)
            for i, p in enumerate(prompts)
        ]
    )
    created = int(time.time())
    n = body.n
    storing = should_store(body.store, model)

    def record(results: list[ChoiceResult]) -> None:
        if storing:
            several = len(prompts) > 1
            record_completion(
                request,
                model,
                completion_id=request_id,
                endpoint="completions",
                sent=body.prompt,
                prompt=prompts[0],
                spec=spec,
                results=results,
                tracker=tracker,
                user=body.user,
                choice_prompts=[prompts[i // n] for i in range(len(results))] if several else None,
                metadata=body.metadata,
            )

    with_ids = body.return_token_ids

    def echo_text(prompt_index: int) -> str:
        """The echoed prompt. With ``return_token_ids`` vLLM leaves its text out (it does
        not detokenize the prompt): the prompt comes back as ``prompt_token_ids``."""
        return prompts[prompt_index].text if body.echo and not with_ids else ""

    def echo_length(prompt_index: int) -> int:
        return len(prompts[prompt_index].text) if body.echo else 0

    def decode(token_id: int) -> str:
        return str(model.renderer.tokenizer.decode(token_id))

    def echoed(prompt_index: int, scored: PromptLogprobs | None) -> CompletionLogprobs | None:
        """The echoed prompt's logprobs, when both ``echo`` and ``logprobs`` ask."""
        if not body.echo or body.logprobs is None:
            return None
        if scored is None:  # the engine always scores a prompt it was asked to
            raise EngineFailure("the engine returned no prompt log-probabilities")
        return echoed_logprobs(prompts[prompt_index], scored, body.logprobs, decode)

    if body.stream:
        include_usage = body.include_usage()

        async def chunks() -> AsyncGenerator[Completion | bytes]:
            frames = StreamFrames(
                Completion(id=request_id, created=created, model=model.name, choices=[])
            )
            started: set[int] = set()
            offsets: dict[int, int] = {}
            prompt_scores: dict[int, PromptLogprobs] = {}
            results = [ChoiceResult(index=i) for i in range(len(prompts) * n)]
            async with contextlib.aclosing(steps):
                async for prompt_index, deltas in steps:
                    tracker.saw(deltas)
                    choices: list[CompletionChoice | str] = []
                    for d in deltas:
                        index = prompt_index * n + d.index
                        results[index].add(d)
                        text = d.text if not scoring_only else ""
                        generated = d.logprobs if not scoring_only else None
                        first_logprobs = None
                        first_ids = None
                        hidden = 0  # echoed text left out (return_token_ids)
                        if index not in started:
                            started.add(index)
                            text = echo_text(prompt_index) + text
                            hidden = echo_length(prompt_index) - len(echo_text(prompt_index))
                            first_ids = prompts[prompt_index].token_ids if with_ids else None
                            scored = d.prompt_logprobs or prompt_scores.get(prompt_index)
                            first_logprobs = echoed(prompt_index, scored)
                        if d.prompt_logprobs is not None:
                            prompt_scores[prompt_index] = d.prompt_logprobs
                        carries_ids = with_ids and bool(first_ids or d.token_ids)
                        if not (text or d.finish_reason or generated or carries_ids):
                            continue
                        offset = offsets.get(index, 0)
                        if generated or first_logprobs or with_ids:
                            choices.append(
                                CompletionChoice(
                                    index=index,
                                    text=text,
                                    logprobs=completion_logprobs(generated, offset, first_logprobs),
                                    finish_reason=d.finish_reason,
                                    prompt_token_ids=first_ids,
                                    token_ids=list(d.token_ids) if with_ids else None,
                                )
                            )
                        else:  # the per-token hot path: text only, as JSON at once
                            choices.append(completion_text_choice(index, text, d.finish_reason))
                        offsets[index] = offset + len(text) + hidden
                    if not choices:
                        continue
                    if all(isinstance(c, str) for c in choices):
                        yield frames.frame(choices)  # type: ignore[arg-type]
                    else:
                        yield Completion(
                            id=request_id,
                            created=created,
                            model=model.name,
                            choices=[
                                CompletionChoice.model_validate_json(c) if isinstance(c, str) else c
                                for c in choices
                            ],
                        )
            record(results)
            if include_usage:
                yield Completion(
                    id=request_id,
                    created=created,
                    model=model.name,
                    choices=[],
                    usage=usage(tracker.prompt_tokens, tracker.completion_tokens),
                )

        return stream_response(sse(chunks(), tracker), model, tracker)

    try:
        results = await unless_disconnected(request, collect(steps, tracker, n, len(prompts)))
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        tracker.close()
    record(results)
    scores: dict[int, PromptLogprobs] = {}
    for r in results:
        if r.prompt_logprobs is not None:
            scores.setdefault(r.index // n, r.prompt_logprobs)
    choices = []
    for r in results:
        p = r.index // n
        prefix = echo_text(p)
        generated = r.logprobs if not scoring_only else ([] if r.logprobs is not None else None)
        choices.append(
            CompletionChoice(
                index=r.index,
                text=prefix + (r.text if not scoring_only else ""),
                logprobs=completion_logprobs(generated, echo_length(p), echoed(p, scores.get(p))),
                finish_reason=r.finish_reason,
                prompt_logprobs=(
                    prompt_logprobs_out(scores.get(p)) if body.prompt_logprobs is not None else None
                ),
                prompt_token_ids=prompts[p].token_ids if with_ids else None,
                token_ids=r.token_ids if with_ids else None,
            )
        )
    return Response(
        Completion(
            id=request_id,
            created=created,
            model=model.name,
            choices=choices,
            usage=usage(tracker.prompt_tokens, sum(len(r.token_ids) for r in results)),
        ).model_dump_json(),
        media_type="application/json",
        headers=response_headers(model, tracker),
    )
