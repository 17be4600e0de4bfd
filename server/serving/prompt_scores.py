"""The prompt's log-probabilities, as vLLM's server answers them: echoed in a completion's
``logprobs`` (``echo``), and as the ``prompt_logprobs`` field (completions and chat).
What log-likelihood evaluations (lm-evaluation-harness's ``loglikelihood``) read.

Owns: those two shapes, built from what the engine scored. Does not know: HTTP, engines.
"""

from __future__ import annotations

from collections.abc import Callable

from server.engine.types import PromptLogprobs
from server.models.render import RenderedPrompt
from server.protocol import CompletionLogprobs, PromptLogprobsOut, PromptTokenLogprob


def echoed_logprobs(
    prompt: RenderedPrompt, scored: PromptLogprobs, k: int, decode: Callable[[int], str]
) -> CompletionLogprobs:
    """The prompt's tokens as vLLM's server echoes them: per token its text, its
    log-probability (null for the first) and a top-``k`` dict that holds the token itself
    and the ``k`` most likely (so up to ``k`` + 1 entries, as OpenAI's API defines)."""
    out = CompletionLogprobs()
    offset = 0
    for token_id, position in zip(prompt.token_ids, scored, strict=True):
        if position is None:
            token, logprob, top = decode(token_id), None, None
        else:
            token, logprob = position[0].token, position[0].logprob
            top = {r.token: r.logprob for i, r in enumerate(position) if i <= k}
        out.tokens.append(token)
        out.token_logprobs.append(logprob)
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(token)
    return out


def prompt_logprobs_out(scored: PromptLogprobs | None) -> PromptLogprobsOut | None:
    """vLLM's ``prompt_logprobs`` field: per token {token id: logprob, rank, text}."""
    if scored is None:
        return None
    return [
        None
        if position is None
        else {
            str(r.token_id): PromptTokenLogprob(
                logprob=r.logprob, rank=r.rank, decoded_token=r.token
            )
            for r in position
        }
        for position in scored
    ]
