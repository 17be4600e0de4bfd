"""The routing memory and rule of the Ray backend (``server.cluster.affinity``), without a
cluster: prefix blocks as vLLM's prefix cache sees them, the longest remembered prefix,
and when affinity gives way to load. The router that uses them runs in
``test_cluster_ray.py`` against two real replicas."""

from __future__ import annotations

from server.cluster.affinity import (
    BLOCK_TOKENS,
    PrefixMemory,
    adapter_key,
    block_hashes,
    preferred,
)
from server.engine.types import AdapterRef


def test_blocks_cover_whole_blocks_and_everything_before_them() -> None:
    prompt = list(range(3 * BLOCK_TOKENS + 5))
    hashes = block_hashes(prompt)
    assert len(hashes) == 3  # the partial last block is not cacheable
    assert block_hashes(prompt[: 2 * BLOCK_TOKENS]) == hashes[:2]
    # The same block after a different prefix is another block.
    other = [7, *prompt[1:]]
    assert block_hashes(other)[1] != hashes[1]
    # An adapter's blocks are not the base model's (vLLM keys its cache by the LoRA too).
    ref = AdapterRef(name="a", id=12, path="/x")
    assert adapter_key(ref) == "a#12" and adapter_key(None) == ""
    assert block_hashes(prompt, adapter_key(ref))[0] != hashes[0]
    assert block_hashes(list(range(BLOCK_TOKENS - 1))) == []


def test_the_longest_remembered_prefix_names_its_replicas() -> None:
    memory = PrefixMemory()
    system = list(range(2 * BLOCK_TOKENS))
    first_turn = system + [100 + i for i in range(2 * BLOCK_TOKENS)]
    memory.record(block_hashes(first_turn), "r1")
    memory.record(block_hashes(system + [900] * BLOCK_TOKENS), "r2")
    live = {"r1", "r2"}
    # The next turn of the conversation: its earlier turn is on r1 only.
    next_turn = first_turn + [5] * (3 * BLOCK_TOKENS)
    assert memory.deepest(block_hashes(next_turn), live) == ({"r1"}, 4)
    # A new conversation shares only the system prompt, which both hold.
    assert memory.deepest(block_hashes(system + [1] * BLOCK_TOKENS), live) == (live, 2)
    # A replica that died is no holder; forgetting it drops what only it held.
    assert memory.deepest(block_hashes(next_turn), {"r2"}) == ({"r2"}, 2)
    memory.forget("r1")
    assert memory.deepest(block_hashes(next_turn), live) == ({"r2"}, 2)
    assert memory.deepest([], live) == (set(), 0)


def test_memory_is_bounded_least_recently_used_out() -> None:
    memory = PrefixMemory(capacity=4)
    old = block_hashes(list(range(2 * BLOCK_TOKENS)))
    memory.record(old, "r1")
    memory.record(block_hashes([9] * (2 * BLOCK_TOKENS)), "r1")
    assert len(memory) == 4
    assert memory.deepest(old, {"r1"}) == ({"r1"}, 2)  # a look-up counts as a use
    memory.record(block_hashes([8] * (2 * BLOCK_TOKENS)), "r2")
    assert len(memory) == 4
    assert memory.deepest(old, {"r1"}) == ({"r1"}, 2)


def test_affinity_prefers_holders_until_they_are_too_busy() -> None:
    live = ["r1", "r2", "r3"]
    idle = {"r1": 0, "r2": 0, "r3": 0}
    # The prefix's holder first; else the adapter's; a set of every replica says nothing.
    assert preferred(live, {"r2"}, {"r3"}, idle, max_imbalance=8) == ["r2"]
    assert preferred(live, set(), {"r3", "r1"}, {"r1": 2, "r3": 1}, 8) == ["r3", "r1"]
    assert preferred(live, set(live), set(), idle, 8) == []
    assert preferred(live, set(), set(), idle, 8) == []
    # A holder more than max_imbalance requests busier than the least busy is passed over
    # (then the adapter's holders are tried, then no preference).
    assert preferred(live, {"r2"}, set(), {"r1": 0, "r2": 9, "r3": 4}, 8) == []
    assert preferred(live, {"r2"}, set(), {"r1": 0, "r2": 8, "r3": 4}, 8) == ["r2"]
    assert preferred(live, {"r2"}, {"r3"}, {"r1": 0, "r2": 9, "r3": 4}, 8) == ["r3"]
    # Holders that are no longer live do not count.
    assert preferred(["r1", "r3"], {"r2"}, set(), idle, 8) == []


def test_a_replica_chosen_for_a_request_serves_that_request() -> None:
    """Ray's FIFOMixin would hand the replica chosen for one request to another one queued
    before it for the same adapter (so a pinned abort or a prefix choice could land
    elsewhere); the router matches the request itself."""
    import asyncio

    from ray.serve._private.common import (
        DeploymentHandleSource,
        DeploymentID,
        RequestMetadata,
    )
    from ray.serve._private.request_router.common import PendingRequest

    from server.cluster.routing import AffinityRouter

    async def route() -> tuple[bool, object]:
        router = AffinityRouter(
            deployment_id=DeploymentID(name="engine", app_name="routing-test"),
            handle_source=DeploymentHandleSource.UNKNOWN,
        )
        router.initialize_state()
        queued = []
        for i in (1, 2):
            metadata = RequestMetadata(
                request_id=f"r{i}", internal_request_id=f"i{i}", multiplexed_model_id="lora"
            )
            pending = PendingRequest(args=[], kwargs={}, metadata=metadata)
            router._pending_requests_to_fulfill.append(pending)
            router._add_pending_request_to_indices(pending)
            queued.append(pending)
        first, second = queued
        router._fulfill_next_pending_request("the replica chosen for r2", second.metadata)
        return first.future.done(), second.future.result()

    first_served, second_got = asyncio.run(route())
    assert not first_served and second_got == "the replica chosen for r2"
