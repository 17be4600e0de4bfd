"""The shared-streams protocol of the Ray backend (``server.cluster.shared_streams``),
without Ray: requests' calls carry each other's steps, each call's deliveries are late by
its own random delay (so one request's steps arrive out of order), and still every request
gets all its steps in order, an error on its own call, and an abort leaves the others
whole. The same code runs on two real replicas in ``test_cluster_ray.py``."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from server.cluster.shared_streams import Inbox, Outbox, StreamLost, carry, receive
from server.cluster.stream_items import decode_step
from server.engine.types import ChoiceDelta


class Engine:
    """One engine step every 2 ms for all requests at once, as vLLM's batch moves."""

    def __init__(self) -> None:
        self._tick = asyncio.Event()
        self.aborted: set[str] = set()
        self.failing: dict[str, int] = {}  # request -> step at which its engine stream fails

    async def run(self, steps: int) -> None:
        for _ in range(steps):
            await asyncio.sleep(0.002)
            tick, self._tick = self._tick, asyncio.Event()
            tick.set()

    async def generate(self, rid: str, steps: int) -> AsyncIterator[list[ChoiceDelta]]:
        for i in range(steps):
            await self._tick.wait()
            if rid in self.aborted:
                yield [ChoiceDelta(index=0, text="", token_ids=[], finish_reason="abort")]
                return
            if self.failing.get(rid) == i:
                raise RuntimeError(f"engine failed {rid}")
            yield [ChoiceDelta(index=0, text=f"{rid}:{i}", token_ids=[i])]


async def serve(
    n: int, steps: int, engine: Engine, rng: random.Random, walk_away: dict[str, int] | None = None
) -> tuple[dict[str, object], int, Outbox]:
    """``n`` requests on one replica through shared streams; what each client got (its
    texts, or its error), how many objects crossed, and the replica's outbox after."""
    outbox = Outbox()
    inboxes = {f"r{i}": Inbox() for i in range(n)}
    crossed = 0

    async def call(rid: str) -> None:  # the request's Ray call: replica side, then transport
        nonlocal crossed
        inbox = inboxes[rid]
        try:
            async for batch in carry(rid, engine.generate(rid, steps), outbox):
                crossed += 1
                await asyncio.sleep(rng.uniform(0, 0.005))  # this call's own latency
                for r, seq, step in batch:
                    if r in inboxes:
                        inboxes[r].add(seq, step)
        except Exception as exc:
            inbox.finish_call(exc)
        else:
            inbox.finish_call()

    async def client(rid: str) -> object:
        texts: list[str] = []
        try:
            async for step in receive(inboxes[rid]):
                texts.append(decode_step(step)[0].text)
                if walk_away and len(texts) == walk_away.get(rid):
                    del inboxes[rid]  # the front end forgets it and asks for an abort
                    engine.aborted.add(rid)
                    return texts
        except Exception as exc:
            return exc
        return texts

    calls = [asyncio.create_task(call(rid)) for rid in inboxes]
    clock = asyncio.create_task(engine.run(steps + 5))
    got = await asyncio.wait_for(asyncio.gather(*(client(rid) for rid in list(inboxes))), 30)
    await asyncio.wait_for(asyncio.gather(*calls), 30)  # every call ends, aborted ones too
    clock.cancel()
    return dict(zip([f"r{i}" for i in range(n)], got, strict=True)), crossed, outbox


@pytest.mark.parametrize("seed", range(5))
def test_every_request_gets_all_its_steps_in_order_in_few_objects(seed: int) -> None:
    got, crossed, outbox = asyncio.run(serve(12, 30, Engine(), random.Random(seed)))
    for rid, texts in got.items():
        assert texts == [f"{rid}:{i}" for i in range(30)], (rid, texts)
    # 360 steps crossed in far fewer objects than one per request per step.
    assert crossed < 360 / 3, crossed
    assert outbox.streams == 0 and outbox.empty


def test_an_engine_error_ends_only_its_own_request_after_its_steps() -> None:
    engine = Engine()
    engine.failing["r3"] = 7
    got, _, _ = asyncio.run(serve(6, 20, engine, random.Random(1)))
    assert isinstance(got["r3"], RuntimeError) and "engine failed r3" in str(got["r3"])
    for rid in ("r0", "r1", "r2", "r4", "r5"):
        assert got[rid] == [f"{rid}:{i}" for i in range(20)]


def test_a_client_that_walks_away_leaves_the_others_whole() -> None:
    engine = Engine()
    got, _, outbox = asyncio.run(serve(8, 25, engine, random.Random(2), {"r0": 3, "r5": 10}))
    assert got["r0"] == [f"r0:{i}" for i in range(3)]
    assert got["r5"] == [f"r5:{i}" for i in range(10)]
    for rid in ("r1", "r2", "r3", "r4", "r6", "r7"):
        assert got[rid] == [f"{rid}:{i}" for i in range(25)]
    assert outbox.streams == 0


def test_a_call_that_ended_without_the_requests_end_is_lost_not_hung() -> None:
    async def run() -> list[str]:
        inbox = Inbox()
        inbox.add(0, ((0, "a", [1], None, None, None),))
        inbox.finish_call()  # its end was on a stream that never delivered
        texts = []
        with pytest.raises(StreamLost):
            async for step in receive(inbox, straggler_timeout_s=0.05):
                texts.append(decode_step(step)[0].text)
        return texts

    assert asyncio.run(run()) == ["a"]
