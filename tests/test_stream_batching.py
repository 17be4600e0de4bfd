"""A replica's stream batching (``cluster.replica.coalesced``): the first step at once, then
at most one batch per interval, every step in order, errors after the steps before them,
and a cancelled stream closes the engine's; each step crosses as plain values
(``cluster.stream_items``) and comes back as the same deltas."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from server.cluster.replica import coalesced
from server.cluster.stream_items import decode_step, encode_step
from server.engine.types import ChoiceDelta, RankedLogprob, TokenLogprob, TopLogprob


def step(i: int) -> list[ChoiceDelta]:
    return [ChoiceDelta(index=0, text=f"t{i}", token_ids=[i])]


def wire(i: int) -> tuple:
    return encode_step(step(i))


async def engine_steps(
    n: int, every_s: float, closed: list[bool], fail_after: int | None = None
) -> AsyncIterator[list[ChoiceDelta]]:
    try:
        for i in range(n):
            await asyncio.sleep(every_s)
            if fail_after is not None and i == fail_after:
                raise RuntimeError("engine stopped")
            yield step(i)
    finally:
        closed.append(True)


async def collect(source: AsyncIterator[list[ChoiceDelta]], interval_s: float) -> list[tuple]:
    return [batch async for batch in coalesced(source, interval_s)]


def test_steps_are_batched_per_interval_in_order() -> None:
    closed: list[bool] = []
    batches = asyncio.run(collect(engine_steps(40, 0.005, closed), 0.05))
    assert batches[0] == (wire(0),)  # the first token is not held back
    assert [s for batch in batches for s in batch] == [wire(i) for i in range(40)]
    assert len(batches) < 20  # ~5 steps per 50 ms batch (timing-tolerant bound)
    assert closed == [True]


def test_interval_zero_sends_every_step() -> None:
    batches = asyncio.run(collect(engine_steps(5, 0.0, []), 0.0))
    assert batches == [(wire(i),) for i in range(5)]


def test_an_engine_error_comes_after_the_steps_before_it() -> None:
    seen: list[tuple] = []

    async def run() -> None:
        async for batch in coalesced(engine_steps(10, 0.002, [], fail_after=6), 0.02):
            seen.append(batch)

    with pytest.raises(RuntimeError, match="engine stopped"):
        asyncio.run(run())
    assert [s for batch in seen for s in batch] == [wire(i) for i in range(6)]


def test_cancelling_the_stream_closes_the_engines() -> None:
    closed: list[bool] = []

    async def run() -> None:
        stream = coalesced(engine_steps(1000, 0.005, closed), 0.05)
        await anext(stream)
        task = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.01)
        task.cancel()  # Ray Serve cancels the call: the client went away
        with pytest.raises(asyncio.CancelledError):
            await task
        await stream.aclose()

    asyncio.run(run())
    assert closed == [True]


def test_a_step_crosses_as_plain_values_and_comes_back_whole() -> None:
    scored = [None, (RankedLogprob(5, " of", -2.5, 3), RankedLogprob(6, " the", -0.5, 1))]
    deltas = [
        ChoiceDelta(index=0, text="Par", token_ids=[42, 7], prompt_logprobs=scored),
        ChoiceDelta(
            index=1,
            text="is",
            token_ids=[9],
            logprobs=[TokenLogprob("is", -0.5, (TopLogprob("is", -0.5), TopLogprob("was", -1.25)))],
            finish_reason="stop",
            stop_reason=2,
        ),
    ]
    encoded = encode_step(deltas)

    def plain(value: object) -> bool:
        if isinstance(value, tuple | list):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, str | int | float)

    assert plain(encoded)  # msgpack's types only: no object goes through cloudpickle
    assert decode_step(encoded) == deltas

    def as_lists(value: object) -> object:  # msgpack may hand tuples back as lists
        return [as_lists(v) for v in value] if isinstance(value, tuple | list) else value

    assert decode_step(as_lists(encoded)) == deltas  # type: ignore[arg-type]
