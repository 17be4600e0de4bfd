"""The front end's side of the Ray backend: a connection to the cluster, one Ray Serve
application per served model, and ``RayEngine`` — what the registry holds in place of a
local ``VllmEngine``, with the same interface.

Owns: connecting (``ray.init``) and starting Ray Serve without its HTTP proxy (the gateway
is the front end), deploying or attaching to the applications and leaving them (the rule
of several front ends is ``frontends``'), streaming a request's deltas
from whichever replica Ray Serve's router (``routing``: power of two choices, with a first
choice for a cached prefix or a loaded adapter) picked, cancelling the
call when the caller stops reading, turning a replica's death into the OpenAI error (or,
before any output, into a retry that Ray Serve routes to a live replica), and each
model's replica health as ``serve.status()`` reports it.
Does not know: templates, HTTP status codes (``errors`` has those), metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from server.cluster.affinity import adapter_key
from server.cluster.config import ClusterSettings
from server.cluster.shared_streams import Inbox, StreamLost, receive
from server.cluster.stream_items import decode_step
from server.engine.types import AdapterRef, ChoiceDelta, EngineStats, Replica, SamplingSpec
from server.engine.vllm_engine import AdapterLoadError, EngineOptions
from server.errors import EngineUnavailable, Overloaded

log = logging.getLogger(__name__)

DEPLOYMENT = "engine"  # the one deployment in each model's application
# Tries of one request when its replica dies before any output (then the next try goes
# to a live replica: Ray Serve's router drops a replica it saw die).
ATTEMPTS = 3
# How often the front end asks Ray Serve for its replicas' state: ``serve.status()`` costs
# ~0.17 s of the front end's CPU here (it cloudpickles each deployment's router class), so
# once a second took ~17 % of a core and held the GIL in the middle of the streams. Every
# 10 s while all is well; every second while a model is short of replicas, and at once
# after a request saw its replica die.
STATUS_PERIOD_S = 10.0
STATUS_PERIOD_UNSETTLED_S = 1.0
# After a request saw a replica die, poll at the unsettled rate this long: Ray Serve's
# controller learns of the death up to a second or so after the router does.
UNSETTLED_AFTER_POKE_S = 60.0
# How long aborting a request whose client went away may wait for its replica.
ABORT_TIMEOUT_S = 30.0
# A replica's queue (from its last reply) counts in the model's engine gauges this long.
STATS_WINDOW_S = 30.0
# How long a front end waits for an application another one is deploying.
ATTACH_TIMEOUT_S = 900.0


def app_name(namespace: str, model: str) -> str:
    """The Ray Serve application of ``model`` (model names may hold ``/`` and ``:``)."""
    return f"{namespace}-{re.sub(r'[^A-Za-z0-9_.-]', '_', model)}"


@dataclass(frozen=True, slots=True)
class ReplicaHealth:
    """A model's replicas as Ray Serve's controller last reported them."""

    running: int = 0
    wanted: int = 1  # the fewest replicas it should have (autoscaling: its `min`)
    reachable: bool = False  # the controller answered
    unhealthy: bool = False  # Serve marks the deployment UNHEALTHY

    @property
    def status(self) -> str:
        """``ok``; ``degraded`` (fewer replicas than wanted, at least one serving); ``down``."""
        if not self.reachable or (self.running == 0 and self.wanted > 0):
            return "down"
        if self.running < self.wanted or self.unhealthy:
            return "degraded"
        return "ok"


def _comparable(value: Any) -> Any:
    """Plain dicts, lists and scalars (what two front ends' settings compare as)."""
    if isinstance(value, dict | Mapping):
        return {str(k): _comparable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_comparable(v) for v in value]
    return value


class RayCluster:
    """This gateway's connection to a Ray cluster and the applications it deployed there."""

    def __init__(self, settings: ClusterSettings) -> None:
        self.settings = settings
        self._wanted: dict[str, int] = {}
        self._health: dict[str, ReplicaHealth] = {}
        self._stop = threading.Event()
        self._poke = threading.Event()
        self._unsettled_until = 0.0
        self._watcher: threading.Thread | None = None
        self._book: Any = None  # ``frontends``' book of members, once deployed
        self._me = ""

    @classmethod
    def connect(cls, settings: ClusterSettings) -> RayCluster:
        """Join the cluster as a driver and make sure Ray Serve runs there (blocking; run
        it off the event loop's thread: in the main thread ``ray.init`` would also replace
        the server's SIGTERM handler, which drains before stopping)."""
        # Ray's C++ failure-signal handler would take the drain's SIGTERM for a crash and
        # abort the process on the next Ray call (the shutdown's `serve.delete`).
        os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
        import ray
        from ray import serve

        ray.init(address=settings.address, namespace=settings.namespace)
        serve.start(proxy_location="Disabled")
        log.info("Connected to Ray at %s (namespace %s)", settings.address, settings.namespace)
        return cls(settings)

    def deploy(
        self,
        models: list[tuple[str, EngineOptions, dict[str, Any], int]],
        cpu_kv_cache_gib: float,
    ) -> list[RayEngine]:
        """Join each ``(model, engine options, deployment options, fewest replicas)``'s
        application (``frontends``): deploy the ones this front end is the first member
        of, attach to the others, and wait until every one is running (blocking)."""
        import ray
        from ray import serve
        from ray.serve.config import RequestRouterConfig

        from server.cluster.frontends import book, dead_members, differences, me
        from server.cluster.replica import EngineReplica

        self._book, self._me = book(self.settings.namespace), me()
        targets, attach = [], []
        for name, options, deployment, wanted in models:
            app = app_name(self.settings.namespace, name)
            self._wanted[app] = wanted
            mine = _comparable(
                {"engine": dataclasses.asdict(options), "deployment": deployment, "wanted": wanted}
            )
            if not ray.get(self._book.join.remote(app, self._me, dead_members(), mine)):
                attach.append(app)
                deployed = ray.get(self._book.deployed_with.remote(app))
                if deployed:
                    # Served as deployed: health counts the replicas it was deployed with.
                    self._wanted[app] = int(deployed.get("wanted", wanted))
                    if changed := differences(mine, deployed):
                        log.warning(
                            "%s runs as another front end deployed it; this models file "
                            "differs (%s): restart every front end of the cluster to change it",
                            app,
                            "; ".join(changed),
                        )
                continue
            router = RequestRouterConfig(**deployment["request_router_config"])
            bound = (
                serve.deployment(EngineReplica)
                .options(**{**deployment, "name": DEPLOYMENT, "request_router_config": router})
                .bind(name, options, cpu_kv_cache_gib, self.settings.stream_interval_ms)
            )
            targets.append(serve.RunTarget(bound, name=app, route_prefix=None))
        handles = serve.run_many(targets) if targets else []
        deployed = dict(zip((t.name for t in targets), handles, strict=True))
        if attach:
            log.info("Attaching to running application(s) %s", ", ".join(attach))
        engines = []
        for name, *_ in models:
            app = app_name(self.settings.namespace, name)
            handle = deployed.get(app) or self._attach(app)
            info = handle.info.remote().result()
            engines.append(RayEngine(name, app, handle, info, self))
        self._poll()
        self._watcher = threading.Thread(target=self._watch, name="ray-serve-status", daemon=True)
        self._watcher.start()
        return engines

    def _attach(self, app: str) -> Any:
        """The handle of ``app``, deployed by another front end (waiting while it starts)."""
        from ray import serve

        deadline = time.monotonic() + ATTACH_TIMEOUT_S
        while True:
            status = getattr(serve.status().applications.get(app), "status", None)
            if str(getattr(status, "value", status)) == "RUNNING":
                return serve.get_app_handle(app)
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ray Serve application {app} is not running ({status})")
            time.sleep(1.0)

    def health(self, app: str) -> ReplicaHealth:
        return self._health.get(app, ReplicaHealth(wanted=self._wanted.get(app, 1)))

    def _poll(self) -> None:
        from ray import serve

        try:
            applications = serve.status().applications
        except Exception as exc:  # the controller or the cluster is gone
            log.warning("Ray Serve status unavailable: %s", exc)
            self._health = {app: ReplicaHealth(wanted=w) for app, w in self._wanted.items()}
            return
        health = {}
        for app, wanted in self._wanted.items():
            deployment = getattr(applications.get(app), "deployments", {}).get(DEPLOYMENT)
            if deployment is None:
                health[app] = ReplicaHealth(wanted=wanted, reachable=True)
                continue
            health[app] = ReplicaHealth(
                running=int(deployment.replica_states.get("RUNNING", 0)),
                wanted=wanted,
                reachable=True,
                unhealthy=str(deployment.status.value) == "UNHEALTHY",
            )
        self._health = health

    def _watch(self) -> None:
        while not self._stop.is_set():
            settled = time.monotonic() >= self._unsettled_until and all(
                h.status == "ok" for h in self._health.values()
            )
            self._poke.wait(STATUS_PERIOD_S if settled else STATUS_PERIOD_UNSETTLED_S)
            self._poke.clear()
            if not self._stop.is_set():
                self._poll()

    def poke(self) -> None:
        """Look at the replicas now and every second for a while (a request just saw
        one die)."""
        self._unsettled_until = time.monotonic() + UNSETTLED_AFTER_POKE_S
        self._poke.set()

    def release(self, app: str) -> None:
        """Leave ``app``; the last front end to leave deletes it (Ray Serve stops its
        replicas)."""
        import ray
        from ray import serve

        from server.cluster.frontends import dead_members

        if self._wanted.pop(app, None) is None or self._book is None:
            return
        if ray.get(self._book.leave.remote(app, self._me, dead_members())):
            serve.delete(app)
        else:
            log.info("Leaving %s to the other front ends that use it", app)

    def close(self) -> None:
        """Stop watching, release what this front end still uses (normally each engine's
        ``shutdown`` did; not when the start failed half-way) and leave the cluster."""
        import ray

        self._stop.set()
        self._poke.set()
        if self._watcher is not None:
            self._watcher.join(timeout=10)
        for app in list(self._wanted):
            try:
                self.release(app)
            except Exception:
                log.exception("Could not delete Ray Serve application %s", app)
        ray.shutdown()


class _Retry(Exception):
    """The replica died before the request's first output: send it again."""


class RayEngine:
    """A model served by the replicas of a Ray Serve deployment; the interface of
    ``VllmEngine`` (the serving code cannot tell them apart, except for ``on_replica``)."""

    replicated = True

    def __init__(
        self, name: str, app: str, handle: Any, info: dict[str, Any], cluster: RayCluster
    ) -> None:
        self.name = name
        self.app = app
        self._handle = handle
        self._streaming = handle.options(stream=True)
        self._streaming_with: dict[str, Any] = {}  # by adapter (``_stream_handle``)
        self._info = info
        self._cluster = cluster
        self._in_flight = 0
        self._seen: dict[str, tuple[float, Replica]] = {}
        # Shared streams (``shared_streams``): this front end's name on the replicas, each
        # request's inbox, and the calls still being read (a call may outlive its request).
        self._frontend = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._inboxes: dict[str, Inbox] = {}
        self._pumps: set[asyncio.Task[None]] = set()

    @property
    def max_model_len(self) -> int:
        return int(self._info["max_model_len"])

    @property
    def lora_enabled(self) -> bool:
        return bool(self._info["lora_enabled"])

    @property
    def max_lora_rank(self) -> int:
        return int(self._info["max_lora_rank"])

    @property
    def healthy(self) -> bool:
        return self._cluster.health(self.app).status != "down"

    @property
    def serving_replicas(self) -> int:
        """The replicas serving now, as Ray Serve last reported them (at least one):
        admission admits ``max_pending_requests`` per replica, so it scales with them."""
        return max(1, self._cluster.health(self.app).running)

    @property
    def status(self) -> str:
        return self._cluster.health(self.app).status

    @property
    def stats(self) -> EngineStats:
        """The replicas' schedulers as their last replies (within a window) reported them."""
        horizon = time.monotonic() - STATS_WINDOW_S
        recent = [r for at, r in self._seen.values() if at >= horizon]
        return EngineStats(
            running=sum(r.running for r in recent), waiting=sum(r.waiting for r in recent)
        )

    def _stream_handle(self, adapter: AdapterRef | None) -> Any:
        """The streaming handle for a request: with an adapter, one that names it as Ray
        Serve's multiplexed model id, so the router knows which replicas hold it
        (``routing``) and the replica counts it as loaded (``replica``)."""
        if adapter is None:
            return self._streaming
        key = adapter_key(adapter)
        handle = self._streaming_with.get(key)
        if handle is None:
            handle = self._streaming_with[key] = self._handle.options(
                stream=True, multiplexed_model_id=key
            )
        return handle

    def num_unfinished(self) -> int:
        """Requests this front end has running on the replicas."""
        return self._in_flight

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        spec: SamplingSpec,
        adapter: AdapterRef | None = None,
        on_replica: Callable[[Replica], None] | None = None,
        trace_headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[list[ChoiceDelta]]:
        """The deltas of ``request_id`` from one replica; ``on_replica`` learns which,
        before the first delta. A replica that dies before any output: the request goes
        again (Ray Serve's router has dropped the dead one). Closing the iterator early
        aborts the request on its replica. ``trace_headers`` are not carried to the
        replica: its engine's spans are not linked to the front end's."""
        self._in_flight += 1
        try:
            for attempt in range(1, ATTEMPTS + 1):
                calls = self._shared if self._cluster.settings.shared_streams else self._own
                try:
                    tried = calls(request_id, prompt_token_ids, spec, adapter, on_replica)
                    async with contextlib.aclosing(tried):  # its ``finally`` runs at once
                        async for step in tried:
                            yield step
                    return
                except _Retry as retry:
                    if attempt == ATTEMPTS:
                        raise EngineUnavailable(
                            f"The engine of model `{self.name}` stopped before answering "
                            f"({ATTEMPTS} tries)."
                        ) from retry
                    log.warning(
                        "Request %s: its replica of %s died or could not be reached before "
                        "answering; trying again (%d/%d)",
                        request_id,
                        self.name,
                        attempt + 1,
                        ATTEMPTS,
                    )
                    await asyncio.sleep(0.1 * attempt)
        finally:
            self._in_flight -= 1

    def _failure(self, exc: BaseException, replica: Replica | None, started: bool) -> Exception:
        """What a call's failure means for the request: ``_Retry`` (its replica died before
        any output), the OpenAI errors, or the replica's own error as raised there."""
        from ray.exceptions import ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError

        if isinstance(exc, RayActorError):
            # ActorUnavailableError: the replica could not be reached for now (a network
            # blip, its node restarting); it may well be alive. Either way the request goes
            # again before any output; only a death makes the replicas worth a look.
            unreachable = isinstance(exc, ActorUnavailableError)
            if not unreachable:
                self._cluster.poke()
            if not started:
                return _Retry()
            where = f"replica {replica.id}" if replica else "a replica"
            what = "could not be reached" if unreachable else "stopped"
            return EngineUnavailable(
                f"The engine of model `{self.name}` ({where}) {what} during the request."
            )
        if isinstance(exc, BackPressureError):
            return Overloaded(f"Every replica of model `{self.name}` is full.")
        return exc if isinstance(exc, Exception) else RuntimeError(str(exc))

    def _fail(
        self,
        exc: Exception,
        replica: Replica | None,
        started: bool,
        on_replica: Callable[[Replica], None] | None,
    ) -> NoReturn:
        """Raise what a call's failure means (``_failure``); a request that fails for good
        before any output still says which replica took it."""
        failure = self._failure(exc, replica, started)
        if not isinstance(failure, _Retry) and not started and on_replica and replica:
            on_replica(replica)
        if failure is exc:
            raise exc
        raise failure from exc

    def _took(self, replica: Replica) -> None:
        self._seen[replica.id] = (time.monotonic(), replica)

    async def _own(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        spec: SamplingSpec,
        adapter: AdapterRef | None,
        on_replica: Callable[[Replica], None] | None,
    ) -> AsyncIterator[list[ChoiceDelta]]:
        """One try, each step on the request's own stream (``shared_streams: false``):
        closing it cancels the call, and Ray Serve cancels it on the replica."""
        response = self._stream_handle(adapter).generate.remote(
            request_id, prompt_token_ids, spec, adapter
        )
        replica: Replica | None = None
        started = over = False
        try:
            async for item in response:
                if isinstance(item, Replica):
                    replica = item
                    self._took(item)
                    continue
                if not started:
                    started = True
                    if on_replica is not None and replica is not None:
                        on_replica(replica)
                for step in item:  # a batch of engine steps (``replica.coalesced``)
                    yield decode_step(step)
            over = True
        except (GeneratorExit, asyncio.CancelledError):
            raise  # the caller stopped reading: ``finally`` cancels the call
        except Exception as exc:
            over = True
            self._fail(exc, replica, started, on_replica)
        finally:
            if not over:
                response.cancel()
        if not started and on_replica is not None and replica is not None:
            on_replica(replica)

    async def _shared(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        spec: SamplingSpec,
        adapter: AdapterRef | None,
        on_replica: Callable[[Replica], None] | None,
    ) -> AsyncIterator[list[ChoiceDelta]]:
        """One try, the steps from this front end's shared streams (``shared_streams``):
        the request's own call brings its replica, its errors and everyone's entries."""
        inbox = self._inboxes[request_id] = Inbox()
        response = self._stream_handle(adapter).generate.remote(
            request_id, prompt_token_ids, spec, adapter, self._frontend
        )
        pump = asyncio.create_task(self._pump(response, inbox))
        self._pumps.add(pump)
        pump.add_done_callback(self._pumps.discard)
        started = done = False
        try:
            async for step in receive(inbox):  # no ``finally`` in it: needs no closing
                if not started:
                    started = True
                    if on_replica is not None and inbox.replica is not None:
                        on_replica(inbox.replica)
                yield decode_step(step)
            done = True
            if not started and on_replica is not None and inbox.replica is not None:
                on_replica(inbox.replica)
        except StreamLost as exc:
            done = True
            raise EngineUnavailable(
                f"The stream of model `{self.name}` lost the end of the request."
            ) from exc
        except Exception as exc:  # the call's own error (``_pump``)
            done = True
            self._fail(exc, inbox.replica, started, on_replica)
        finally:
            self._inboxes.pop(request_id, None)
            if not done and not inbox.call_over:
                # The caller stopped reading. Cancelling the call could drop other
                # requests' entries it carries: the replica aborts the request instead,
                # and the call ends as any other.
                aborting = asyncio.create_task(self._abort_on_replica(request_id, inbox, pump))
                self._pumps.add(aborting)
                aborting.add_done_callback(self._pumps.discard)

    async def _pump(self, response: Any, inbox: Inbox) -> None:
        """Read one call to its end: the replica that took it, then batches of entries
        for any of this front end's requests."""
        try:
            async for item in response:
                if isinstance(item, Replica):
                    self._took(item)
                    inbox.set_replica(item)
                    continue
                for request_id, seq, step in item:
                    box = self._inboxes.get(request_id)
                    if box is not None:  # else the request is over here (client gone)
                        box.add(seq, step)
        except asyncio.CancelledError:
            inbox.finish_call(EngineUnavailable(f"Model `{self.name}` is shutting down."))
            raise
        except Exception as exc:
            inbox.finish_call(exc)
        else:
            inbox.finish_call()

    async def _abort_on_replica(self, request_id: str, inbox: Inbox, pump: asyncio.Task) -> None:
        """Abort a request whose caller went away, on the replica that took it (its call
        goes on carrying other requests' entries until the replica ends it)."""
        deadline = time.monotonic() + ABORT_TIMEOUT_S
        while inbox.replica is None and not inbox.call_over:
            if time.monotonic() > deadline or not await inbox.changed(within_s=ABORT_TIMEOUT_S):
                break
        if inbox.replica is not None and not inbox.call_over:
            call = self._handle.abort.remote(request_id, inbox.replica.id)
            try:
                await asyncio.wait_for(call, ABORT_TIMEOUT_S)
            except Exception as exc:
                call.cancel()
                log.warning(
                    "Could not abort %s on replica %s: %s", request_id, inbox.replica.id, exc
                )
        try:
            await asyncio.wait_for(asyncio.shield(pump), ABORT_TIMEOUT_S)
        except TimeoutError:
            pump.cancel()  # the replica did not end it: give the call up after all

    async def add_adapter(self, ref: AdapterRef) -> None:
        """Check the adapter on one replica (its engine loads it: vLLM's own checks, now
        rather than on the first request). Every other replica loads it on the first
        request that names it: each request carries its ``AdapterRef``, and vLLM loads a
        LoRA it has not cached from ``ref.path`` (which every node must read at the same
        path), keeping up to ``max_cpu_loras`` in an LRU and ``max_loras`` per batch."""
        problem = await self._handle.add_adapter.remote(ref)
        if problem is not None:
            raise AdapterLoadError(problem)

    async def remove_adapter(self, ref: AdapterRef) -> None:
        """Nothing on the replicas: once the registry drops the name no request carries
        the adapter, and the replicas' LRU (vLLM's, and Ray Serve's multiplexed set of the
        same size) evicts it when the room is needed."""
        return None

    async def abort(self, request_id: str) -> None:
        """Nothing to do: closing ``generate``'s iterator cancels the call on its replica."""
        return None

    async def check_health(self) -> None:
        if not self.healthy:
            raise RuntimeError(f"no replica of {self.name} is running")

    def shutdown(self) -> None:
        """Leave this model's application; the last front end to leave deletes it, and
        Ray Serve stops its replicas (each shuts its engine down). Calls still being read
        (an abort's, or one carrying others' steps: normally none after the drain) stop."""
        for task in list(self._pumps):
            task.cancel()
        self._cluster.release(self.app)
