"""One replica of a model's engine inside a Ray Serve deployment: the project's own
``VllmEngine``, started and used exactly as the local backend does.

Owns: what runs in each replica actor — its platform's engine environment and defaults
(decided by ``resources.platform`` for *that* machine, which may differ from the front
end's), the engine's start and stop, streaming a request's deltas back (first a
``Replica`` saying who took it), aborting in the engine when Ray Serve cancels the call
(client gone), loading an adapter when asked or on the first request that carries it
(through Ray Serve's multiplexing, which tells the routers which replicas hold it), and
the health check Ray Serve calls.
Does not know: templates or tokenizers (the front end sends token ids), HTTP, routing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from server.cluster.affinity import adapter_key
from server.cluster.shared_streams import Outbox, carry
from server.cluster.stream_items import EncodedStep, encode_step
from server.engine.types import AdapterRef, ChoiceDelta, Replica, SamplingSpec
from server.engine.vllm_engine import AdapterLoadError, EngineOptions, VllmEngine
from server.resources.platform import (
    apply_engine_environment,
    detect,
    engine_defaults,
    engine_dtype,
)

log = logging.getLogger(__name__)


def _replica_id() -> str:
    from ray import serve

    return str(serve.get_replica_context().replica_id.unique_id)


_END = object()


async def coalesced(
    steps: AsyncIterator[list[ChoiceDelta]], interval_s: float
) -> AsyncIterator[tuple[EncodedStep, ...]]:
    """The engine's steps, batched: the first at once (time to first token), then at most
    one batch per ``interval_s`` holding every step that arrived meanwhile (0: each step on
    its own). Each batch is one object through Ray, so a batch per interval bounds the
    objects per stream (Ray Serve LLM batches its streams the same way, every 50 ms by
    default). Errors of the engine's stream come after the steps before them."""
    if interval_s <= 0:
        async for step in steps:
            yield (encode_step(step),)
        return
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def read() -> None:
        try:
            async for step in steps:
                queue.put_nowait(step)
        except Exception as exc:  # handed on to the consumer, after the steps before it
            queue.put_nowait(exc)
        queue.put_nowait(_END)

    reader = asyncio.create_task(read())
    try:
        last = None
        while True:
            batch = [await queue.get()]
            if last is not None:
                await asyncio.sleep(max(0.0, last + interval_s - time.monotonic()))
            while not queue.empty():
                batch.append(queue.get_nowait())
            ended = batch[-1] is _END
            error = next((b for b in batch if isinstance(b, Exception)), None)
            ready = tuple(
                encode_step(b) for b in batch if b is not _END and not isinstance(b, Exception)
            )
            if ready:
                yield ready
                last = time.monotonic()
            if error is not None:
                raise error
            if ended:
                return
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


def _adapter_set(
    engine: VllmEngine, capacity: int
) -> Callable[[AdapterRef], Awaitable[None]] | None:
    """What the replica calls before a request with an adapter: Ray Serve's multiplexing
    (``serve.multiplexed``), which loads the adapter into the engine the first time and
    reports the replica's adapters to every front end's router (``routing`` prefers a
    replica that has a request's adapter). Its LRU has the engine's own size
    (``max_cpu_loras``), so the two evict alike. None without LoRA."""
    if capacity <= 0:
        return None
    from ray import serve

    refs: dict[str, AdapterRef] = {}

    async def load(key: str) -> str:
        try:
            await engine.add_adapter(refs[key])
        except AdapterLoadError as exc:  # the request gets vLLM's own error as it runs
            log.warning("Adapter %s not loaded ahead of its request: %s", key, exc)
        return key

    multiplexed = serve.multiplexed(max_num_models_per_replica=capacity)(load)

    async def hold(adapter: AdapterRef) -> None:
        key = adapter_key(adapter)
        refs[key] = adapter
        await multiplexed(key)

    return hold


class EngineReplica:
    """The class each Ray Serve replica instantiates (``serve.deployment`` wraps it in
    ``ray_engine``; kept a plain class so it imports and reads without Ray)."""

    async def __init__(
        self,
        name: str,
        options: EngineOptions,
        cpu_kv_cache_gib: float,
        stream_interval_ms: float = 0.0,
    ):
        platform = detect()
        apply_engine_environment(platform, cpu_kv_cache_gib)
        options = dataclasses.replace(
            options,
            dtype=engine_dtype(options.dtype, platform),
            extra={**engine_defaults(platform), **options.extra},
        )
        self.name = name
        self.replica = _replica_id()
        self.stream_interval_s = stream_interval_ms / 1000
        # As the local registry does: vLLM's start blocks; off the replica's event loop.
        self._engine = await asyncio.to_thread(VllmEngine.start, name, options)
        self._hold = _adapter_set(self._engine, int(options.extra.get("max_cpu_loras") or 0))
        self._outboxes: dict[str, Outbox] = {}  # by front end (``shared_streams``)
        log.info("Replica %s of %s up (pid %d)", self.replica, name, os.getpid())

    async def info(self) -> dict[str, Any]:
        """What the front end checks requests against (the same for every replica)."""
        return {
            "replica": self.replica,
            "max_model_len": self._engine.max_model_len,
            "lora_enabled": self._engine.lora_enabled,
            "max_lora_rank": self._engine.max_lora_rank,
        }

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        spec: SamplingSpec,
        adapter: AdapterRef | None = None,
        frontend: str | None = None,
    ) -> AsyncIterator[Replica | tuple[Any, ...]]:
        """A ``Replica`` (this one, with its engine's queue), then the engine's steps, each
        as plain values (``stream_items``): with ``frontend``, as entries of that front
        end's shared streams (``shared_streams``: this call may carry other requests'
        entries, and its own may go on another call); without, in batches of its own
        (``coalesced``).

        Ray Serve cancels this call when the front end does (client gone, own streams
        only): the ``CancelledError`` closes the engine's stream, which aborts the request
        in vLLM. With shared streams the front end calls ``abort`` instead."""
        stats = self._engine.stats
        yield Replica(
            id=self.replica,
            running=stats.running,
            waiting=stats.waiting,
            unfinished=self._engine.num_unfinished(),
        )
        if adapter is not None and self._hold is not None:
            await self._hold(adapter)
        steps = self._engine.generate(request_id, prompt_token_ids, spec, adapter=adapter)
        if frontend is None:
            async with contextlib.aclosing(steps):
                async for batch in coalesced(steps, self.stream_interval_s):
                    yield batch
            return
        outbox = self._outboxes.get(frontend)
        if outbox is None:
            outbox = self._outboxes[frontend] = Outbox()
        try:
            async with contextlib.aclosing(carry(request_id, steps, outbox)) as entries:
                async for batch in entries:
                    yield batch
        finally:
            if outbox.streams == 0 and self._outboxes.get(frontend) is outbox:
                del self._outboxes[frontend]  # what is left has no request waiting for it

    async def abort(self, request_id: str, replica: str) -> None:
        """Abort a request whose client went away (``shared_streams``; the front end's
        router sends this to ``replica``, the one that took it). Anywhere else it would
        abort nothing while the request runs on: an error the front end logs."""
        if replica != self.replica:
            raise RuntimeError(
                f"the abort of {request_id} for replica {replica} reached {self.replica}"
            )
        await self._engine.abort(request_id)

    async def add_adapter(self, ref: AdapterRef) -> str | None:
        """Load ``ref`` into this replica's engine; None, or why vLLM refused it (as text:
        the front end raises its own error, not a pickled one from the replica)."""
        try:
            await self._engine.add_adapter(ref)
        except AdapterLoadError as exc:
            return str(exc)
        return None

    async def check_health(self) -> None:
        """Ray Serve's periodic health check: an engine that errored or stopped fails it,
        and Ray Serve replaces the replica."""
        if not self._engine.healthy:
            raise RuntimeError(f"engine of {self.name} on replica {self.replica} is down")
        await self._engine.check_health()

    def __del__(self) -> None:
        # Ray Serve calls this on a graceful stop (scale-down, redeploy, delete).
        engine = getattr(self, "_engine", None)
        if engine is not None:
            with contextlib.suppress(Exception):
                engine.shutdown()
