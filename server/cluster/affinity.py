"""What a front end remembers of where its requests went, so the next request that shares
a prompt prefix or an adapter with earlier ones can prefer the replica that already holds
it (``routing`` decides; this module only remembers and looks up, without Ray).

Owns: a prompt's prefix blocks (chained hashes of 16-token blocks, seeded with the adapter,
as vLLM's prefix cache keys its blocks: a block is only reusable after the same blocks
before it, under the same LoRA), a bounded least-recently-used map from block to the
replicas sent it, per Serve application, and the rule that picks the preferred replicas.
Does not know: Ray, queue lengths, HTTP.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Collection, Sequence

from server.engine.types import AdapterRef

BLOCK_TOKENS = 16
# Blocks remembered per application (each a hash and a small set): ~200 MB of prompts'
# worth of 16-token blocks at 1M would be far more than any replica's KV cache holds.
CAPACITY_BLOCKS = 200_000


def adapter_key(adapter: AdapterRef | None) -> str:
    """The string a request's adapter is known by in routing (Ray Serve's multiplexed
    model id): its name and id (the id changes when the adapter's files do); "" for none."""
    if adapter is None:
        return ""
    return f"{adapter.name}#{adapter.id}"


def block_hashes(token_ids: Sequence[int], adapter: str = "") -> list[int]:
    """One hash per full block of ``token_ids``, each covering every block before it."""
    hashes = []
    running = hash(("aligngate-prefix", adapter))
    for start in range(0, len(token_ids) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        running = hash((running, tuple(token_ids[start : start + BLOCK_TOKENS])))
        hashes.append(running)
    return hashes


class PrefixMemory:
    """Which replicas were sent each prefix block, least recently used out. Called from the
    Serve router's thread and the gateway's event loop, hence the lock."""

    def __init__(self, capacity: int = CAPACITY_BLOCKS) -> None:
        self.capacity = capacity
        self._holders: OrderedDict[int, set[str]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._holders)

    def record(self, hashes: Sequence[int], replica: str) -> None:
        """``replica`` now holds every block of ``hashes``."""
        with self._lock:
            for h in hashes:
                holders = self._holders.get(h)
                if holders is None:
                    self._holders[h] = {replica}
                else:
                    holders.add(replica)
                    self._holders.move_to_end(h)
            while len(self._holders) > self.capacity:
                self._holders.popitem(last=False)

    def deepest(self, hashes: Sequence[int], live: Collection[str]) -> tuple[set[str], int]:
        """The live replicas holding the longest remembered prefix of ``hashes``, and how
        many blocks long it is (``set(), 0`` when none holds even the first block)."""
        found: set[str] = set()
        depth = 0
        with self._lock:
            for h in hashes:
                holders = self._holders.get(h)
                alive = {r for r in holders if r in live} if holders else set()
                if not alive:
                    break
                found, depth = alive, depth + 1
                self._holders.move_to_end(h)
        return found, depth

    def forget(self, replica: str) -> None:
        """``replica`` is gone (its cache with it)."""
        with self._lock:
            for h in [h for h, holders in self._holders.items() if replica in holders]:
                holders = self._holders[h]
                holders.discard(replica)
                if not holders:
                    del self._holders[h]


def preferred(
    live: Collection[str],
    prefix_holders: Collection[str],
    adapter_holders: Collection[str],
    load: dict[str, int],
    max_imbalance: int,
) -> list[str]:
    """The replicas a request should try first, least loaded first; [] for no preference.

    The holders of its longest cached prefix come first, else the replicas that have its
    adapter loaded. A set that every live replica is in (a system prompt every replica has
    seen) says nothing. A preferred replica more than ``max_imbalance`` requests busier
    than the least busy live one is passed over: affinity saves a prefill or an adapter
    load, never worth a long queue."""
    least = min((load.get(r, 0) for r in live), default=0)
    for holders in (prefix_holders, adapter_holders):
        chosen = [r for r in holders if r in live]
        if not chosen or len(chosen) >= len(live):
            continue
        within = [r for r in chosen if load.get(r, 0) <= least + max_imbalance]
        if within:
            return sorted(within, key=lambda r: load.get(r, 0))
    return []


_MEMORIES: dict[str, PrefixMemory] = {}
_MEMORIES_LOCK = threading.Lock()


def memory(app: str) -> PrefixMemory:
    """This process's memory of ``app`` (its router and its engine share it)."""
    with _MEMORIES_LOCK:
        return _MEMORIES.setdefault(app, PrefixMemory())
