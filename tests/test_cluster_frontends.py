"""Stateless front ends: two `aligngate serve` processes with the same models file share one
Ray cluster's application (the second attaches; neither redeploys it) and one PostgreSQL
store. What one stores the other serves and judges; an adapter one loads, both list and
serve; an online iteration started on both at once runs once (the store's lock) as a Ray
task, and its adapter is hot-loaded onto the replicas; what one promotes, the other serves;
the application outlives the first front end to leave and goes with the last."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Gateway, start_own_gateway, stop_gateway
from tests.ray_cluster import RayHead, ray_head

pytestmark = pytest.mark.slow

REPLICA = "x-aligngate-replica"
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayHead]:
    with ray_head(num_cpus=2) as head:
        yield head
    assert not head.pids(), f"Ray processes outlived the cluster: {head.pids()}"


@pytest.fixture(scope="module")
def front_ends(
    ray_cluster: RayHead,
    postgres_admin_url: str,
    test_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
    adapters_root: Path,
    arena_adapter: str,
) -> Iterator[tuple[Gateway, Gateway]]:
    from tests.postgres import create_database

    models_yaml = f"""
cluster:
  backend: ray
  address: {ray_cluster.address}
  namespace: aligngate-frontends
models:
  - name: smollm2-135m-instruct
    path: builtin:smollm2-135m-instruct
    max_model_len: 4096
    replicas: 1
    num_cpus: 1
    lora: {{}}  # rank 16: what an online iteration trains
"""
    # Adapters of their own: the iteration below writes `<base>-iter1`, which other
    # modules' iterations (on the session's root) would otherwise continue from.
    root = tmp_path_factory.mktemp("fe-adapters")
    shutil.copytree(adapters_root / arena_adapter, root / arena_adapter)
    env = {
        "ALIGNGATE_DATABASE_URL": create_database(postgres_admin_url),
        "ALIGNGATE_ADAPTERS_DIR": str(root),
    }
    started = time.monotonic()
    first = start_own_gateway(tmp_path_factory.mktemp("fe1"), models_yaml, test_env, env)
    TIMINGS["first_ready_s"] = time.monotonic() - started
    replicas = ray_cluster.replica_pids()
    started = time.monotonic()
    # The second front end's file asks for two replicas: it attaches to the application as
    # deployed (one replica, not redeployed) and says what differs.
    second_yaml = models_yaml.replace("replicas: 1", "replicas: 2")
    second = start_own_gateway(tmp_path_factory.mktemp("fe2"), second_yaml, test_env, env)
    TIMINGS["second_ready_s"] = time.monotonic() - started
    assert ray_cluster.replica_pids() == replicas, (replicas, ray_cluster.replica_pids())
    log_text = second.log_path.read_text()
    assert "Attaching to running application" in log_text
    assert "deployment.num_replicas: 1 deployed, 2 here" in log_text, log_text[-3000:]
    # Its health counts the replicas the application was deployed with.
    assert httpx.get(f"{second.url}/health", timeout=30).json()["status"] == "ok"
    yield first, second
    for gateway in (first, second):
        if gateway.process.poll() is None:
            assert stop_gateway(gateway) == 0, gateway.log_tail()
    print("front-end timings:", json.dumps({k: round(v, 1) for k, v in TIMINGS.items()}))


def chat(gateway: Gateway, content: str, **fields: object) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json={
            "model": gateway.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 8,
            "temperature": 0,
            **fields,
        },
        timeout=120,
    )


def test_both_serve_one_replica_and_one_store(front_ends: tuple[Gateway, Gateway]) -> None:
    first, second = front_ends
    ids = []
    for gateway in (first, second, first, second):
        r = chat(gateway, "What is the capital of France?", store=True)
        assert r.status_code == 200, r.text
        ids.append(r.json()["id"])
        assert r.headers[REPLICA]
    assert len(set(ids)) == len(ids)  # completion ids stay unique across front ends
    time.sleep(1.5)  # the stores' group commit
    for gateway in (first, second):
        listed = httpx.get(f"{gateway.url}/v1/chat/completions?limit=100").json()["data"]
        assert set(ids) <= {c["id"] for c in listed}
    # Stored through the first, judged through the second.
    posted = httpx.post(
        f"{second.url}/v1/feedback",
        json={"completion_id": ids[0], "annotator": "test", "judgment": "Say only: Paris."},
    )
    assert posted.status_code in (200, 201), posted.text


def test_an_adapter_loaded_on_one_is_served_by_both(
    front_ends: tuple[Gateway, Gateway], arena_adapter: str
) -> None:
    first, second = front_ends
    r = httpx.post(
        f"{first.url}/admin/adapters", json={"name": "fe-arena", "path": arena_adapter}, timeout=120
    )
    assert r.status_code == 201, r.text
    for gateway in (first, second):
        listed = {m["id"] for m in httpx.get(f"{gateway.url}/v1/models").json()["data"]}
        assert "fe-arena" in listed, (gateway.url, listed)
    answer = httpx.post(
        f"{second.url}/v1/completions",
        json={"model": "fe-arena", "prompt": "Paris is", "max_tokens": 4},
        timeout=120,
    )
    assert answer.status_code == 200 and answer.json()["model"] == "fe-arena", answer.text
    assert httpx.delete(f"{second.url}/admin/adapters/fe-arena", timeout=60).status_code == 200
    gone = httpx.post(
        f"{first.url}/v1/completions", json={"model": "fe-arena", "prompt": "hi", "max_tokens": 1}
    )
    assert gone.status_code == 404


async def _align_on_both(first: Gateway, second: Gateway, body: dict) -> list[httpx.Response]:  # type: ignore[type-arg]
    async with httpx.AsyncClient(timeout=60) as http:
        return list(
            await asyncio.gather(
                *(http.post(f"{g.url}/admin/align", json=body) for g in (first, second))
            )
        )


def test_an_iteration_runs_on_one_front_end_at_a_time(
    front_ends: tuple[Gateway, Gateway],
) -> None:
    first, second = front_ends
    body = {
        "model": first.model,
        "include_unreviewed": True,
        "hyperparameters": {"epochs": 1, "batch_size": 1, "warmup_steps": 0},
        "gate": {"enabled": False},
    }
    replies = asyncio.run(_align_on_both(first, second, body))
    codes = sorted(r.status_code for r in replies)
    assert codes == [202, 409], [r.text for r in replies]
    refused = next(r for r in replies if r.status_code == 409)
    assert "another front end" in refused.json()["error"]["message"], refused.text
    runner = first if replies[0].status_code == 202 else second
    other = second if runner is first else first
    job = next(r for r in replies if r.status_code == 202).json()
    started = time.monotonic()
    while job["status"] not in ("succeeded", "failed"):
        assert time.monotonic() - started < 600, job
        time.sleep(1)
        job = httpx.get(f"{runner.url}/admin/align/{job['id']}").json()
    TIMINGS["align_s"] = time.monotonic() - started
    assert job["status"] == "succeeded", job
    # The worker ran as a Ray task (this cluster has no GPU: none was asked for).
    assert job["trained_on"]["backend"] == "ray", job
    assert re.fullmatch(r"[0-9a-f]{56}", job["trained_on"]["node"])  # a Ray node id
    assert job["trained_on"]["resources"] == {"num_cpus": 1, "num_gpus": 0.0}
    # Hot-loaded onto the replicas, and listed and served by the other front end too.
    name = job["adapter"]
    for gateway in (runner, other):
        answer = httpx.post(
            f"{gateway.url}/v1/completions",
            json={"model": name, "prompt": "Paris is", "max_tokens": 4},
            timeout=120,
        )
        assert answer.status_code == 200, answer.text
    # Promoted on one front end, `NAME@latest` serves the new version on the other too.
    alias = f"{runner.model}@latest"
    promoted = httpx.post(f"{runner.url}/admin/promote", json={"alias": alias, "version": name})
    assert promoted.status_code == 200, promoted.text
    assert chat(other, "Hi", model=alias).json()["model"] == name
    series = f'aligngate_promoted_version{{alias="{alias}",version="{name}"}} 1.0'
    assert series in httpx.get(f"{other.url}/metrics").text
    back = httpx.post(f"{other.url}/admin/promote", json={"alias": alias, "version": runner.model})
    assert back.json()["previous"] == name, back.text
    assert chat(runner, "Hi", model=alias).json()["model"] == runner.model
    # The lock went with the job: the next iteration may start (and finds nothing new).
    again = httpx.post(f"{other.url}/admin/align", json=body)
    assert again.status_code == 202, again.text


def test_the_application_outlives_the_first_front_end_to_leave(
    front_ends: tuple[Gateway, Gateway], ray_cluster: RayHead
) -> None:
    first, second = front_ends
    time.sleep(2)  # the previous test's last iteration fails at once (nothing to train)
    assert stop_gateway(first) == 0, first.log_tail()
    assert chat(second, "Hello").status_code == 200
    assert ray_cluster.replica_pids()
    assert stop_gateway(second) == 0, second.log_tail()
    deadline = time.monotonic() + 30
    while ray_cluster.replica_pids() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_cluster.replica_pids(), "the last front end left the replicas running"
