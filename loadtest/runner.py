"""Drive a target with a fixed number of concurrent clients or a Poisson arrival process.

A run ends when ``num_requests`` have been sent or ``duration_s`` has passed (whichever comes
first) and every sent request has finished; its duration runs from the first send to the last
completion, as in ``vllm bench serve``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx

from loadtest.client import Target, send
from loadtest.stats import RequestResult, Slo, summarize
from loadtest.workload import Item


@dataclass(frozen=True, slots=True)
class Load:
    """How to load the target: ``concurrency`` clients in a loop, or ``rate`` requests/s."""

    concurrency: int | None = None
    rate: float | None = None
    num_requests: int = 100
    duration_s: float | None = None
    # With a rate: cap on requests in flight (None: unbounded, as vLLM's bench).
    max_concurrency: int | None = None

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give exactly one of concurrency or rate")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be positive")
        if self.num_requests < 1:
            raise ValueError("num_requests must be at least 1")

    @property
    def label(self) -> str:
        return f"c={self.concurrency}" if self.concurrency is not None else f"rate={self.rate}/s"


@dataclass(slots=True)
class RunResult:
    load: Load
    duration_s: float
    results: list[RequestResult] = field(default_factory=list)

    def summary(self, slo: Slo | None = None) -> dict[str, object]:
        return {
            "load": {
                "concurrency": self.load.concurrency,
                "rate": self.load.rate,
                "num_requests": self.load.num_requests,
                "duration_s": self.load.duration_s,
            },
            **summarize(self.results, self.duration_s, slo),
        }


def _client(connections: int, timeout_s: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        # Environment proxies must never take loopback traffic elsewhere.
        trust_env=False,
    )


async def _closed_loop(
    client: httpx.AsyncClient, target: Target, items: Iterator[Item], load: Load, start: float
) -> list[RequestResult]:
    assert load.concurrency is not None
    results: list[RequestResult] = []
    deadline = start + load.duration_s if load.duration_s else None

    async def worker() -> None:
        while len(results) + in_flight[0] < load.num_requests:
            if deadline is not None and time.perf_counter() >= deadline:
                return
            in_flight[0] += 1
            item = next(items)
            try:
                result = await send(client, target, item, start)
            finally:
                in_flight[0] -= 1
            results.append(result)

    in_flight = [0]
    await asyncio.gather(*(worker() for _ in range(load.concurrency)))
    return results


async def _poisson(
    client: httpx.AsyncClient,
    target: Target,
    items: Iterator[Item],
    load: Load,
    start: float,
    seed: int,
) -> list[RequestResult]:
    assert load.rate is not None
    rng = random.Random(seed)
    gate = asyncio.Semaphore(load.max_concurrency) if load.max_concurrency else None
    deadline = start + load.duration_s if load.duration_s else None

    async def one(item: Item) -> RequestResult:
        if gate is None:
            return await send(client, target, item, start)
        async with gate:
            return await send(client, target, item, start)

    tasks = []
    next_at = start
    for _ in range(load.num_requests):
        if deadline is not None and next_at >= deadline:
            break
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(next(items))))
        next_at += rng.expovariate(load.rate)
    return list(await asyncio.gather(*tasks))


async def run_load(
    target: Target,
    items: Iterator[Item],
    load: Load,
    *,
    seed: int = 0,
    timeout_s: float = 600.0,
    warmup: int = 1,
    on_start: Callable[[], None] | None = None,
) -> RunResult:
    """Warm the target up (unrecorded), then run the load and time it; ``on_start`` runs
    between the two (e.g. to read the server's CPU time)."""
    connections = load.concurrency or load.max_concurrency or max(load.num_requests, 1)
    async with _client(connections, timeout_s) as client:
        for _ in range(warmup):
            await send(client, target, next(items), time.perf_counter())
        if on_start is not None:
            on_start()
        start = time.perf_counter()
        if load.concurrency is not None:
            results = await _closed_loop(client, target, items, load, start)
        else:
            results = await _poisson(client, target, items, load, start, seed)
        duration = time.perf_counter() - start
    results.sort(key=lambda r: r.started_at)
    return RunResult(load, duration, results)
