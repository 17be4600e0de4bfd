"""One replica of a model's engine inside a Ray Serve deployment: the project's own
``VllmEngine``, started and used exactly as the local backend does.

Owns: what runs in each replica actor — its platform's engine environment and defaults
(decided by ``resources.platform`` for *that* machine, which may differ from the front
end's), the engine's start and stop, streaming a request's deltas back (first a
``Replica`` saying who took it), aborting in the engine when Ray Serve cancels the call
(client gone), loading an adapter when asked (otherwise the engine loads it on the first
request that carries it), and the health check Ray Serve calls.
Does not know: templates or tokenizers (the front end sends token ids), HTTP, routing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from server.engine.types import AdapterRef, ChoiceDelta, Replica, SamplingSpec
from server.engine.vllm_engine import AdapterLoadError, EngineOptions, VllmEngine
from server.resources.platform import apply_engine_environment, detect, engine_defaults

log = logging.getLogger(__name__)


def _replica_id() -> str:
    from ray import serve

    return str(serve.get_replica_context().replica_id.unique_id)


class EngineReplica:
    """The class each Ray Serve replica instantiates (``serve.deployment`` wraps it in
    ``ray_engine``; kept a plain class so it imports and reads without Ray)."""

    async def __init__(self, name: str, options: EngineOptions, cpu_kv_cache_gib: float):
        platform = detect()
        apply_engine_environment(platform, cpu_kv_cache_gib)
        options = dataclasses.replace(options, extra={**engine_defaults(platform), **options.extra})
        self.name = name
        self.replica = _replica_id()
        # As the local registry does: vLLM's start blocks; off the replica's event loop.
        self._engine = await asyncio.to_thread(VllmEngine.start, name, options)
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
    ) -> AsyncIterator[Replica | list[ChoiceDelta]]:
        """A ``Replica`` (this one, with its engine's queue), then the engine's deltas.

        Ray Serve cancels this call when the front end does (client gone): the
        ``CancelledError`` closes the engine's stream, which aborts the request in vLLM."""
        stats = self._engine.stats
        yield Replica(
            id=self.replica,
            running=stats.running,
            waiting=stats.waiting,
            unfinished=self._engine.num_unfinished(),
        )
        steps = self._engine.generate(request_id, prompt_token_ids, spec, adapter=adapter)
        async with contextlib.aclosing(steps):
            async for deltas in steps:
                yield deltas

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
