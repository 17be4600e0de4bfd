"""The Ray Serve backend, end to end: a Ray cluster on loopback started by the test, a
gateway whose models file has a `cluster:` section serving the embedded model as two
replicas, the same OpenAI API suite as the local backend, and a replica killed under load.
One cluster for the module (the only one that needs it)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import Gateway, start_own_gateway, stop_gateway
from tests.postgres import create_database
from tests.ray_cluster import RayHead, ray_head
from tests.test_metrics_and_disconnects import metric

# The OpenAI API suite, run here against the Ray backend (`gateway` below overrides the
# session's local gateway for this module).
from tests.test_openai_api import (  # noqa: F401
    client,
    test_chat_logprobs_are_finite,
    test_completions_stream,
    test_completions_take_several_prompts_and_token_ids,
    test_greedy_answer_names_paris,
    test_length_finish_and_usage_match_the_tokenizer,
    test_models_lists_the_default_model,
    test_n_returns_that_many_choices,
    test_raw_sse_ends_with_done,
    test_stop_string_ends_the_answer,
    test_stream_concatenates_to_the_same_text,
    test_stream_with_n_covers_every_choice,
)

pytestmark = pytest.mark.slow

REPLICA = "x-aligngate-replica"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
LONG = [{"role": "user", "content": "Write a very long essay about the history of Europe."}]
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayHead]:
    with ray_head(num_cpus=2) as head:
        TIMINGS["cluster_start_s"] = head.started_s
        yield head
    assert not head.pids(), f"Ray processes outlived the cluster: {head.pids()}"


@pytest.fixture(scope="module")
def gateway(
    ray_cluster: RayHead,
    default_model_path: Path,
    test_env: dict[str, str],
    postgres_admin_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Gateway]:
    models_yaml = f"""
cluster:
  backend: ray
  address: {ray_cluster.address}
  namespace: aligngate-test
  # Affinity gives way at 2 requests beyond the least busy replica (default 8), so a burst
  # of identical requests (below) still reaches both replicas.
  routing: {{max_imbalance: 2}}
models:
  - name: smollm2-135m-instruct
    path: builtin:smollm2-135m-instruct
    max_model_len: 8192
    replicas: 2
    num_cpus: 1
    lora: {{max_rank: 8}}
"""
    started = time.monotonic()
    store = {"ALIGNGATE_DATABASE_URL": create_database(postgres_admin_url)}  # shared state
    gw = start_own_gateway(tmp_path_factory.mktemp("ray-gateway"), models_yaml, test_env, store)
    TIMINGS["gateway_ready_s"] = time.monotonic() - started
    yield gw
    code = stop_gateway(gw)
    assert code == 0, f"gateway exited with {code} on SIGTERM:\n{gw.log_tail()}"
    # The gateway deleted its application: no replica is left on the cluster.
    deadline = time.monotonic() + 30
    while ray_cluster.replica_pids() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_cluster.replica_pids(), "replicas outlived the gateway's application"
    print("ray timings:", json.dumps({k: round(v, 1) for k, v in TIMINGS.items()}))


def chat(gateway: Gateway, messages: list[dict[str, str]], **fields: object) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": gateway.model, "messages": messages, **fields},
        timeout=120,
    )


async def replicas_serving(gateway: Gateway, requests: int = 12) -> list[str]:
    """The replica header of ``requests`` concurrent requests for one prompt.

    Each holds its replica for 32 tokens: the first replica to see the prompt is preferred
    (its prefix) until it holds ``max_imbalance`` more requests than the other, and with
    4-token answers a slow front end could hand requests to the router more slowly than
    the preferred replica finished them (on CI, all 12 went to one replica)."""
    async with httpx.AsyncClient(timeout=120) as http:
        replies = await asyncio.gather(
            *(
                http.post(
                    f"{gateway.url}/v1/chat/completions",
                    json={
                        "model": gateway.model,
                        "messages": FRANCE,
                        "max_tokens": 32,
                        "min_tokens": 32,
                    },
                )
                for _ in range(requests)
            )
        )
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    return [r.headers[REPLICA] for r in replies]


def test_every_response_names_its_replica_and_both_serve(gateway: Gateway) -> None:
    seen = asyncio.run(replicas_serving(gateway))
    assert len(set(seen)) == 2, seen
    with httpx.stream(
        "POST",
        f"{gateway.url}/v1/chat/completions",
        json={"model": gateway.model, "messages": FRANCE, "max_tokens": 4, "stream": True},
        timeout=60,
    ) as response:
        assert response.headers[REPLICA] in set(seen)
        assert response.headers["x-aligngate-template"]
        assert [line for line in response.iter_lines() if line][-1] == "data: [DONE]"
    health = httpx.get(f"{gateway.url}/health", timeout=10)
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "models": {gateway.model: "ok"}}
    for replica in set(seen):
        assert metric(gateway, "aligngate_replica_requests_total", replica=replica, outcome="ok")


def _next_token(gateway: Gateway, model: str, prompt: str) -> tuple[str, float, str]:
    """The replica, the greedy next token's log-probability and the token, for ``model``."""
    r = httpx.post(
        f"{gateway.url}/v1/completions",
        json={"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 1},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    logprobs = r.json()["choices"][0]["logprobs"]
    return r.headers[REPLICA], logprobs["token_logprobs"][0], logprobs["tokens"][0]


async def _concurrently(gateway: Gateway, model: str, prompt: str, n: int) -> list[tuple]:
    return list(
        await asyncio.gather(
            *(asyncio.to_thread(_next_token, gateway, model, prompt) for _ in range(n))
        )
    )


def test_an_adapter_loaded_on_the_gateway_is_served_by_every_replica(
    gateway: Gateway, arena_adapter: str, adapters_root: Path
) -> None:
    name = "ray-arena"
    started = time.monotonic()
    r = httpx.post(
        f"{gateway.url}/admin/adapters",
        json={"name": name, "path": arena_adapter},
        timeout=120,
    )
    assert r.status_code == 201, r.text
    TIMINGS["adapter_load_s"] = time.monotonic() - started
    listed = {m["id"]: m for m in httpx.get(f"{gateway.url}/v1/models").json()["data"]}
    assert listed[name]["parent"] == gateway.model

    prompt = "The capital of France is"
    base = asyncio.run(_concurrently(gateway, gateway.model, prompt, 8))
    base_logprob = base[0][1]
    # What batching alone moves a log-probability by (bf16 on the CPU), to compare with.
    noise = max(abs(lp - base_logprob) for _, lp, _ in base)
    tuned: list[tuple] = []
    started = time.monotonic()
    while len({replica for replica, _, _ in tuned}) < 2:
        assert time.monotonic() - started < 120, f"one replica served the adapter: {tuned}"
        tuned += asyncio.run(_concurrently(gateway, name, prompt, 8))
    TIMINGS["adapter_on_both_replicas_s"] = time.monotonic() - started
    # Every replica ran the adapter (the one that loaded it, and the other on demand):
    # far from the base model's log-probability, and the replicas agree.
    effect = min(abs(lp - base_logprob) for _, lp, _ in tuned)
    assert effect > max(5 * noise, 0.01), (effect, noise, tuned, base_logprob)
    per_replica = {replica: logprob for replica, logprob, _ in tuned}
    assert max(per_replica.values()) - min(per_replica.values()) < effect / 2, per_replica
    print(f"log p: base {base_logprob:.4f} (±{noise:.4f}), adapter per replica {per_replica}")

    # The gateway's own checks still run first: a missing folder, a rank above the
    # replicas' maximum.
    refused = httpx.post(
        f"{gateway.url}/admin/adapters", json={"name": "x", "path": "no-such-adapter"}
    )
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "path"
    wide = adapters_root / "ray-rank16"
    if not wide.exists():
        shutil.copytree(adapters_root / arena_adapter, wide)
        config = json.loads((wide / "adapter_config.json").read_text())
        (wide / "adapter_config.json").write_text(json.dumps({**config, "r": 16}))
    refused = httpx.post(f"{gateway.url}/admin/adapters", json={"name": "x", "path": wide.name})
    assert refused.status_code == 400 and "max LoRA rank 8" in refused.text, refused.text
    assert httpx.delete(f"{gateway.url}/admin/adapters/{name}", timeout=60).status_code == 200
    gone = httpx.post(
        f"{gateway.url}/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 1}
    )
    assert gone.status_code == 404


def test_a_conversation_stays_on_the_replica_that_holds_its_prefix(gateway: Gateway) -> None:
    # Each turn's prompt begins with the previous turn's (the template renders the history
    # first), and the router sends it where those blocks are cached. Power of two choices
    # alone would put 8 sequential requests on one of two idle replicas 1 time in 128.
    messages = [
        {
            "role": "user",
            "content": "Let us plan a trip through the Alps in late spring, by train, "
            "with stops in Chamonix, Zermatt and the Bernese Oberland. Start with Chamonix.",
        }
    ]
    served = []
    for turn in range(8):
        r = chat(gateway, messages, max_tokens=8, temperature=0)
        assert r.status_code == 200, r.text
        served.append(r.headers[REPLICA])
        answer = r.json()["choices"][0]["message"]["content"]
        messages += [
            {"role": "assistant", "content": answer},
            {"role": "user", "content": f"Good. Now step {turn + 2}: what comes next?"},
        ]
    assert len(set(served)) == 1, served


def test_adapter_requests_prefer_a_replica_that_has_it_loaded(
    gateway: Gateway, arena_adapter: str
) -> None:
    name = "ray-affinity"
    r = httpx.post(
        f"{gateway.url}/admin/adapters", json={"name": name, "path": arena_adapter}, timeout=120
    )
    assert r.status_code == 201, r.text
    try:
        # Prompts shorter than one cache block: only the adapter can attract them.
        first, _, _ = _next_token(gateway, name, "Hello")
        time.sleep(2)  # the replica reports its adapters through Serve's controller
        served = [_next_token(gateway, name, f"Word {i}:")[0] for i in range(8)]
        assert set(served) == {first}, (first, served)
        # Without the adapter, the same prompts go anywhere (both replicas).
        base = set()
        started = time.monotonic()
        while len(base) < 2:
            assert time.monotonic() - started < 60, base
            base |= {_next_token(gateway, gateway.model, f"Word {i}:")[0] for i in range(4)}
    finally:
        httpx.delete(f"{gateway.url}/admin/adapters/{name}", timeout=60)


def test_errors_keep_the_openai_shape(gateway: Gateway) -> None:
    # The replica's engine refuses the sampling parameters: a 400, as in local mode.
    refused = chat(gateway, FRANCE, max_tokens=4, top_k=-5)
    assert refused.status_code == 400
    assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
    too_long = chat(gateway, FRANCE, max_tokens=9000)
    assert too_long.status_code == 400
    assert too_long.json()["error"]["code"] == "context_length_exceeded"


async def _open_and_drop(gateway: Gateway, streams: int) -> None:
    async with httpx.AsyncClient(timeout=60) as http:
        for _ in range(streams):
            async with http.stream(
                "POST",
                f"{gateway.url}/v1/chat/completions",
                json={
                    "model": gateway.model,
                    "messages": LONG,
                    "max_tokens": 2000,
                    "min_tokens": 1500,
                    "stream": True,
                },
            ) as response:
                events = 0
                async for line in response.aiter_lines():
                    events += bool(line)
                    if events == 4:
                        break  # tokens are coming: go away mid-stream


def test_a_client_that_goes_away_is_aborted_on_its_replica(gateway: Gateway) -> None:
    asyncio.run(_open_and_drop(gateway, 4))
    # Each replica reports the requests its engine holds as it takes a new one. One at a
    # time, until both replicas said none (1,500+ tokens each would take minutes here).
    started = time.monotonic()
    held: dict[str, float] = {}
    while len(held) < 2 or any(held.values()):
        assert time.monotonic() - started < 30, f"requests left on the replicas: {held}"
        replica = chat(gateway, FRANCE, max_tokens=2).headers[REPLICA]
        held[replica] = metric(
            gateway, "aligngate_replica_engine_requests", replica=replica, state="unfinished"
        )
    TIMINGS["aborted_within_s"] = time.monotonic() - started


async def _stream_until_done(
    http: httpx.AsyncClient, gateway: Gateway, started: asyncio.Event
) -> dict[str, object]:
    events: list[str] = []
    async with http.stream(
        "POST",
        f"{gateway.url}/v1/chat/completions",
        json={"model": gateway.model, "messages": LONG, "max_tokens": 300, "stream": True},
    ) as response:
        replica = response.headers.get(REPLICA)
        async for line in response.aiter_lines():
            if line:
                events.append(line)
                started.set()
    return {"replica": replica, "status": response.status_code, "events": events}


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def _watch_health(http: httpx.AsyncClient, gateway: Gateway, statuses: set[str]) -> None:
    """/health's status every half second until cancelled (Serve may replace the replica
    before the killed requests have all ended: the degraded window is watched from the
    kill on)."""
    while True:
        health = await http.get(f"{gateway.url}/health", timeout=10)
        assert health.status_code == 200, health.text
        statuses.add(health.json()["status"])
        await asyncio.sleep(0.5)


async def _kill_under_load(
    gateway: Gateway, cluster: RayHead, statuses: set[str]
) -> tuple[list, list, float, list[int]]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(90)) as http:
        starts = [asyncio.Event() for _ in range(6)]
        streams = [asyncio.create_task(_stream_until_done(http, gateway, s)) for s in starts]
        await asyncio.wait_for(asyncio.gather(*(s.wait() for s in starts)), timeout=90)
        whole = [
            asyncio.create_task(
                http.post(
                    f"{gateway.url}/v1/chat/completions",
                    json={"model": gateway.model, "messages": LONG, "max_tokens": 200},
                )
            )
            for _ in range(2)
        ]
        await asyncio.sleep(0.5)
        victims = cluster.replica_pids()
        assert len(victims) == 2, victims
        victim_cores = [
            p.pid
            for p in psutil.Process(victims[0]).children(recursive=True)
            if "VLLM::EngineCore" in " ".join(p.cmdline())
        ]
        os.kill(victims[0], signal.SIGKILL)
        killed_at = time.monotonic()
        watch = asyncio.create_task(_watch_health(http, gateway, statuses))
        try:
            # No request hangs: all end well within the client timeout.
            streamed = await asyncio.wait_for(asyncio.gather(*streams), timeout=120)
            answered = await asyncio.wait_for(asyncio.gather(*whole), timeout=120)
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
    return streamed, answered, killed_at, victim_cores


def test_a_killed_replica_fails_its_requests_cleanly_and_comes_back(
    gateway: Gateway, ray_cluster: RayHead
) -> None:
    before = set(asyncio.run(replicas_serving(gateway)))
    assert len(before) == 2
    statuses: set[str] = set()
    streamed, answered, killed_at, victim_cores = asyncio.run(
        _kill_under_load(gateway, ray_cluster, statuses)
    )
    assert len(victim_cores) == 1, victim_cores

    failed = [s for s in streamed if any('"error"' in e for e in s["events"])]
    assert failed, "no stream was on the killed replica"
    dead = {s["replica"] for s in failed}
    assert len(dead) == 1, dead
    for s in streamed:
        events = s["events"]
        assert s["status"] == 200 and events[-1] == "data: [DONE]", events[-3:]
        if s in failed:
            # The OpenAI error as an SSE event, then [DONE].
            error = json.loads(events[-2].removeprefix("data: "))["error"]
            assert error["code"] == "engine_unavailable", error
            assert error["type"] == "server_error"
        else:
            assert s["replica"] not in dead
            assert any('"finish_reason":"' in e for e in events), events[-3:]
    for reply in answered:
        if reply.status_code != 200:
            assert reply.status_code == 503, reply.text
            assert reply.json()["error"]["code"] == "engine_unavailable"
    # For the closing figures: of 6 streams and 2 whole answers, how many failed.
    TIMINGS["kill_failed_streams"] = len(failed)
    TIMINGS["kill_failed_answers"] = sum(r.status_code != 200 for r in answered)

    # New requests are served at once, by the live replica.
    fresh = chat(gateway, FRANCE, max_tokens=4)
    assert fresh.status_code == 200 and fresh.headers[REPLICA] not in dead

    # Ray Serve replaces the replica; meanwhile /health says degraded (still 200).
    deadline = time.monotonic() + 240
    while True:
        health = httpx.get(f"{gateway.url}/health", timeout=10)
        assert health.status_code == 200, health.text
        statuses.add(health.json()["status"])
        seen = set(asyncio.run(replicas_serving(gateway, requests=6)))
        if len(seen) == 2 and not seen & dead:
            break
        assert time.monotonic() < deadline, f"no second replica after the kill: {seen}"
        time.sleep(1)
    TIMINGS["recovery_s"] = time.monotonic() - killed_at
    assert "degraded" in statuses, statuses
    deadline = time.monotonic() + 30
    while httpx.get(f"{gateway.url}/health", timeout=10).json()["status"] != "ok":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    errors = sum(
        metric(gateway, "aligngate_replica_requests_total", replica=r, outcome="error")
        for r in dead
    )
    assert errors >= len(failed)
    # The killed replica's engine core went with it, and each live replica has one (its
    # title is set once the core has imported vLLM: a replica Serve restarted meanwhile,
    # e.g. after a missed health check on these 2 busy cores, may still be starting it).
    deadline = time.monotonic() + 90
    while (
        any(_alive(pid) for pid in victim_cores)
        or len(engines := ray_cluster.replica_pids("VLLM::EngineCore")) != 2
    ):
        assert time.monotonic() < deadline, (victim_cores, ray_cluster.replica_pids("VLLM::"))
        time.sleep(1)
    assert not set(engines) & set(victim_cores)


def _streamed_text(gateway: Gateway, messages: list[dict[str, str]]) -> str:
    parts = []
    with httpx.stream(
        "POST",
        f"{gateway.url}/v1/chat/completions",
        json={
            "model": gateway.model,
            "messages": messages,
            "max_tokens": 16,
            "temperature": 0,
            "stream": True,
        },
        timeout=120,
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line.removeprefix("data: "))["choices"]:
                    parts.append(choice["delta"].get("content") or "")
    return "".join(parts)


def test_without_shared_streams_each_request_streams_on_its_own(
    ray_cluster: RayHead,
    test_env: dict[str, str],
    postgres_admin_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # `shared_streams: false`: each request's steps on its own call, cancelled with its
    # client. A second gateway and application on the same cluster (its replica asks for
    # no CPU: the first gateway's two replicas hold the cluster's two).
    models_yaml = f"""
cluster:
  backend: ray
  address: {ray_cluster.address}
  namespace: aligngate-test-own
  shared_streams: false
models:
  - name: smollm2-135m-instruct
    path: builtin:smollm2-135m-instruct
    max_model_len: 4096
    replicas: 1
    num_cpus: 0
"""
    store = {"ALIGNGATE_DATABASE_URL": create_database(postgres_admin_url)}
    own = start_own_gateway(tmp_path_factory.mktemp("ray-own"), models_yaml, test_env, store)
    try:
        whole = chat(own, FRANCE, max_tokens=16, temperature=0)
        assert whole.status_code == 200, whole.text
        assert _streamed_text(own, FRANCE) == whole.json()["choices"][0]["message"]["content"]
        asyncio.run(_open_and_drop(own, 2))
        started = time.monotonic()
        while True:  # the dropped streams' requests leave the replica's engine
            replica = chat(own, FRANCE, max_tokens=2).headers[REPLICA]
            held = metric(
                own, "aligngate_replica_engine_requests", replica=replica, state="unfinished"
            )
            if not held:
                break
            assert time.monotonic() - started < 30, f"{held} requests left on the replica"
            time.sleep(0.5)
    finally:
        assert stop_gateway(own) == 0, own.log_tail()
