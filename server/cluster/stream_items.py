"""A stream's engine steps as they cross from a replica to the front end: plain tuples of
strings, numbers and lists.

Why not the ``ChoiceDelta`` dataclasses themselves: Ray serializes plain values with
msgpack, but any other object through cloudpickle, whose every ``dumps`` looks up the
object's module and class (py-spy on a replica at 16 streams: ~5 % of its samples in
cloudpickle, and the front end's unpickling besides). One object per engine step per
request crosses, so the per-object cost is what the hop pays per token.
Owns: the encoding and its inverse (msgpack may hand tuples back as lists).
Does not know: Ray, engines.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.engine.types import (
    ChoiceDelta,
    PromptLogprobs,
    RankedLogprob,
    TokenLogprob,
    TopLogprob,
)

EncodedStep = tuple[tuple[Any, ...], ...]


def _encode_logprobs(logprobs: list[TokenLogprob] | None) -> tuple[Any, ...] | None:
    if logprobs is None:
        return None
    return tuple((t.token, t.logprob, tuple((p.token, p.logprob) for p in t.top)) for t in logprobs)


def _decode_logprobs(encoded: Sequence[Any] | None) -> list[TokenLogprob] | None:
    if encoded is None:
        return None
    return [
        TokenLogprob(token, logprob, tuple(TopLogprob(t, lp) for t, lp in top))
        for token, logprob, top in encoded
    ]


def _encode_prompt(prompt: PromptLogprobs | None) -> tuple[Any, ...] | None:
    if prompt is None:
        return None
    return tuple(
        None
        if position is None
        else tuple((r.token_id, r.token, r.logprob, r.rank) for r in position)
        for position in prompt
    )


def _decode_prompt(encoded: Sequence[Any] | None) -> PromptLogprobs | None:
    if encoded is None:
        return None
    return [
        None if position is None else tuple(RankedLogprob(*ranked) for ranked in position)
        for position in encoded
    ]


def encode_step(step: Sequence[ChoiceDelta]) -> EncodedStep:
    """One engine step (a delta per choice that moved) as plain values."""
    return tuple(
        (
            d.index,
            d.text,
            d.token_ids,
            _encode_logprobs(d.logprobs),
            d.finish_reason,
            d.stop_reason,
            _encode_prompt(d.prompt_logprobs),
        )
        for d in step
    )


def decode_step(encoded: Sequence[Sequence[Any]]) -> list[ChoiceDelta]:
    """The step ``encode_step`` encoded."""
    return [_decode_delta(*item) for item in encoded]


def _decode_delta(
    index: int,
    text: str,
    token_ids: Sequence[int],
    logprobs: Sequence[Any] | None,
    finish_reason: str | None,
    stop_reason: int | str | None,
    prompt: Sequence[Any] | None = None,  # absent from a replica that predates it
) -> ChoiceDelta:
    return ChoiceDelta(
        index=index,
        text=text,
        token_ids=list(token_ids),
        logprobs=_decode_logprobs(logprobs),
        finish_reason=finish_reason,
        stop_reason=stop_reason,
        prompt_logprobs=_decode_prompt(prompt),
    )
