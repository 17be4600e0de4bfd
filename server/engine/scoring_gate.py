"""Requests whose prompt vLLM must score alone in its batch, on an engine with LoRA on.

vLLM 0.32's prompt log-probabilities with LoRA enabled compute the prompt's logits through
the LoRA logits layer with the batch's per-request LoRA indices: with one request in the
batch they broadcast, with several the shapes disagree (CPU: ``einsum(): subscript b has
size 3 … size 4``) and the engine core dies, taking every request with it. A client
sending ``prompt_logprobs`` (or ``echo`` with ``logprobs``: lm-eval's loglikelihood) next
to any other traffic could kill the model.

So such a request waits until the engine has nothing else in flight, runs alone until
its prompt is scored (its first output), and the engine takes other requests again from
then on. Requests wanting to be alone are served in turn, and new ordinary requests wait
behind one (no starvation). An engine without LoRA needs none of this.

Owns: the counting and waiting. Does not know: vLLM (the engine decides who must be
alone), HTTP.
"""

from __future__ import annotations

import asyncio


class ScoringGate:
    def __init__(self) -> None:
        self._condition: asyncio.Condition | None = None  # made on the serving event loop
        self._running = 0  # requests in the engine now
        self._alone = False  # a request is being scored alone
        self._queued_alone = 0  # requests waiting to be alone

    def _cond(self) -> asyncio.Condition:
        if self._condition is None:
            self._condition = asyncio.Condition()
        return self._condition

    async def enter(self, alone: bool) -> None:
        """Wait for a turn: ``alone`` until nothing else runs, otherwise until no request is
        being or waiting to be scored alone."""
        cond = self._cond()
        async with cond:
            if alone:
                self._queued_alone += 1
                try:
                    await cond.wait_for(lambda: not self._alone and self._running == 0)
                finally:
                    self._queued_alone -= 1
                self._alone = True
            else:
                await cond.wait_for(lambda: not self._alone and self._queued_alone == 0)
            self._running += 1

    async def scored(self) -> None:
        """The alone request's prompt is scored: others may join the batch."""
        cond = self._cond()
        async with cond:
            self._alone = False
            cond.notify_all()

    async def leave(self, alone_still: bool) -> None:
        """A request left the engine (``alone_still``: before its prompt was scored)."""
        cond = self._cond()
        async with cond:
            self._running -= 1
            if alone_still:
                self._alone = False
            cond.notify_all()
