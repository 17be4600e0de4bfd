"""Which replica takes a request: Ray Serve's request-router extension (the class each
model's deployment names in its ``request_router_config``; it runs inside every front
end's deployment handle).

Owns: sending an ``abort`` to the replica it names (shared streams: the replica that
took the request), and for everything else power of two choices as Ray Serve's default
router does it (two random replicas, the nearer ones first, the less busy of the two as
this router counts its requests in flight, each tried in turn),
preceded by a first choice for requests that continue a cached prefix (a conversation's
next turn: the replica that was sent its earlier turns, remembered by ``affinity``) or
name an adapter (the replicas that report it loaded, through Ray Serve's multiplexing),
unless that replica is far busier than the least busy (``affinity.preferred``).
Does not know: HTTP, templates, engines.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict, deque
from typing import Any

from ray.serve.request_router import (
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from server.cluster import affinity

UNSENT_EXPIRY_S = 1.0


def _two_of(candidates: list[Any]) -> list[Any]:
    if len(candidates) <= 2:
        return random.sample(candidates, len(candidates))
    return random.sample(candidates, 2)


class AffinityRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    """Power of two choices, with a first choice for a request's prefix or adapter.

    Without Ray's ``FIFOMixin``: a replica chosen for a request serves that request (the
    base router matches the internal request id), never another one queued before it or
    for the same adapter, so a pinned ``abort`` and a prefix choice land where chosen."""

    def initialize_state(self, affinity_enabled: bool = True, max_imbalance: int = 8) -> None:
        self._affinity = affinity_enabled
        self._max_imbalance = max_imbalance
        self._memory = affinity.memory(self._deployment_id.app_name)
        # First choices not yet sent, by replica (when each was made). Serve counts a
        # request in a replica's queue only once it is sent, after the routing task has
        # moved on to the next request: without these, a burst of requests for one
        # prefix would all see the holder idle and all go to it.
        self._chosen: dict[str, deque[float]] = defaultdict(deque)
        # Requests this router sent to each replica and that have not finished: Serve's
        # queue-length cache forgets a replica after 10 s without traffic.
        self._in_flight: dict[str, int] = defaultdict(int)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is not None and pending_request.metadata.call_method == "abort":
            # To the replica that took the request (``EngineReplica.abort``); while it is
            # not there (gone), back off: the caller gives up after a while.
            pending_request.routing_context.should_backoff = True
            pinned = pending_request.args[1]
            return [[r for r in candidate_replicas if r.replica_id.unique_id == pinned]]
        nearby = self.apply_locality_routing(pending_request)  # all of them, in the end
        fallback = _two_of([self._replicas[r] for r in nearby if r in self._replicas])
        if not self._affinity or pending_request is None or len(candidate_replicas) < 2:
            return [fallback]
        first = self._first_choice(candidate_replicas, pending_request)
        if first:
            return [first, *self._less_busy_first(fallback)]
        return self._less_busy_first(fallback, note=True)

    def _less_busy_first(
        self, two: list[RunningReplica], *, note: bool = False
    ) -> list[list[RunningReplica]]:
        """The two, less busy first as this router counts (``_load``), each its own rank.

        Given both in one rank, Serve takes the one its queue-length cache holds and only
        probes the other in the background: a replica unused for 10 s has no cache entry,
        so a burst went wholly to the one that had (seen: 12 of 12). As single ranks, the
        first is probed when it is not cached, and the second tried only if it does not
        answer. ``note``: count the first as chosen until it is sent (a burst's routing
        decisions are all made before the first send)."""
        ordered = sorted(two, key=lambda r: self._load(r.replica_id))  # ties: random order
        if note and ordered:
            self._chosen[ordered[0].replica_id.unique_id].append(time.monotonic())
        return [[r] for r in ordered]

    def _first_choice(
        self, candidates: list[RunningReplica], request: PendingRequest
    ) -> list[RunningReplica]:
        token_ids, adapter = _prompt_and_adapter(request)
        if token_ids is None:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidates}
        prefix_holders, _ = self._memory.deepest(
            affinity.block_hashes(token_ids, affinity.adapter_key(adapter)), by_id
        )
        model_id = request.metadata.multiplexed_model_id
        adapter_holders = {
            r.unique_id for r in self._multiplexed_model_id_to_replica_ids.get(model_id, ())
        }
        load = {rid: self._load(r.replica_id) for rid, r in by_id.items()}
        chosen = affinity.preferred(
            by_id, prefix_holders, adapter_holders, load, self._max_imbalance
        )
        if not chosen:
            return []
        self._chosen[chosen[0]].append(time.monotonic())
        return [by_id[chosen[0]]]

    def _load(self, replica_id: ReplicaID) -> int:
        """Requests ``replica_id`` holds as this router knows it: Serve's cached queue length
        or the requests sent and not finished, whichever is more, plus first choices not
        sent yet."""
        rid = replica_id.unique_id
        cached = self._replica_queue_len_cache.get(replica_id) or 0
        return max(cached, self._in_flight.get(rid, 0)) + self._unsent(rid)

    def _unsent(self, replica: str) -> int:
        """First choices of ``replica`` made in the last second and not sent yet (one
        that went elsewhere after all expires)."""
        made = self._chosen[replica]
        horizon = time.monotonic() - UNSENT_EXPIRY_S
        while made and made[0] < horizon:
            made.popleft()
        return len(made)

    def on_send_request(self, replica_id: ReplicaID) -> None:
        super().on_send_request(replica_id)  # Serve now counts it in the replica's queue
        self._in_flight[replica_id.unique_id] += 1
        made = self._chosen.get(replica_id.unique_id)
        if made:
            made.popleft()

    def decrement_queue_len_cache(self, replica_id: ReplicaID) -> None:
        """A request sent to ``replica_id`` finished (Serve calls this whether or not its
        cache is on)."""
        super().decrement_queue_len_cache(replica_id)
        rid = replica_id.unique_id
        if self._in_flight.get(rid, 0) > 0:
            self._in_flight[rid] -= 1

    def on_new_queue_len_info(self, replica_id: ReplicaID, num_ongoing_requests: int) -> None:
        """The replica said how many requests it holds (a probe's or a rejection's answer):
        the count starts again from there."""
        super().on_new_queue_len_info(replica_id, num_ongoing_requests)
        self._in_flight[replica_id.unique_id] = num_ongoing_requests

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        """The replica now holds the request's prompt (its engine caches the prefix)."""
        token_ids, adapter = _prompt_and_adapter(pending_request)
        if token_ids is not None:
            hashes = affinity.block_hashes(token_ids, affinity.adapter_key(adapter))
            self._memory.record(hashes, replica_id.unique_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._memory.forget(replica_id.unique_id)
        self._in_flight.pop(replica_id.unique_id, None)


def _prompt_and_adapter(request: PendingRequest) -> tuple[list[int] | None, Any]:
    """A ``generate`` call's prompt token ids and adapter (its arguments are
    ``request_id, prompt_token_ids, spec, adapter``); None for other calls."""
    args = request.args
    if len(args) < 2 or not isinstance(args[1], list):
        return None, None
    return args[1], args[3] if len(args) > 3 else None
