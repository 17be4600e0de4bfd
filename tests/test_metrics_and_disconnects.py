"""/health, /metrics, and clients that go away: nothing is left running in the engine."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest
from sqlalchemy import func, select

from server.store import Store
from server.store.schema import completions
from tests.conftest import Gateway

LONG = [{"role": "user", "content": "Write a very long essay about the history of Europe."}]


def metric(gateway: Gateway, name: str, **labels: str) -> float:
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    total = 0.0
    found = False
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if not match or match.group(1) != name:
            continue
        label_text = match.group(2) or ""
        if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            total += float(match.group(3))
            found = True
    return total if found else 0.0


def wait_until_idle(gateway: Gateway, timeout: float = 10) -> float:
    deadline = time.monotonic() + timeout
    while True:
        left = metric(gateway, "aligngate_engine_unfinished_requests", model=gateway.model)
        left += metric(gateway, "aligngate_in_flight_requests", model=gateway.model)
        if left == 0 or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def assert_answers_promptly(gateway: Gateway, within_s: float = 5) -> None:
    """After clients went away, a fresh request is answered within ``within_s``."""
    started = time.monotonic()
    fresh = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": gateway.model, "messages": LONG, "max_tokens": 4},
        timeout=30,
    )
    elapsed = time.monotonic() - started
    print(f"fresh request answered in {elapsed:.2f} s")
    assert fresh.status_code == 200 and elapsed < within_s


def test_health_is_200_with_every_engine_up(gateway: Gateway) -> None:
    response = httpx.get(f"{gateway.url}/health", timeout=10)
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "models": {gateway.model: "ok"}}


def test_metrics_move_after_a_request(gateway: Gateway) -> None:
    labels = {"model": gateway.model, "endpoint": "/v1/chat/completions", "status": "200"}
    before = metric(gateway, "aligngate_requests_total", **labels)
    tokens_before = metric(gateway, "aligngate_completion_tokens_total", model=gateway.model)
    ttft_before = metric(
        gateway, "aligngate_time_to_first_token_seconds_count", model=gateway.model
    )
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": gateway.model, "messages": LONG, "max_tokens": 5},
        timeout=60,
    )
    assert response.status_code == 200
    assert metric(gateway, "aligngate_requests_total", **labels) == before + 1
    assert (
        metric(gateway, "aligngate_completion_tokens_total", model=gateway.model)
        == tokens_before + 5
    )
    assert (
        metric(gateway, "aligngate_time_to_first_token_seconds_count", model=gateway.model)
        == ttft_before + 1
    )
    assert metric(gateway, "aligngate_request_latency_seconds_count", model=gateway.model) >= 1
    assert metric(gateway, "aligngate_prompt_tokens_total", model=gateway.model) > 0


def test_errors_are_counted_by_status(gateway: Gateway) -> None:
    labels = {"endpoint": "/v1/chat/completions", "status": "400"}
    before = metric(gateway, "aligngate_requests_total", **labels)
    httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": gateway.model, "messages": []},
        timeout=10,
    )
    assert metric(gateway, "aligngate_requests_total", **labels) == before + 1


@pytest.mark.slow
def test_stream_disconnect_aborts_in_the_engine(gateway: Gateway) -> None:
    body = {
        "model": gateway.model,
        "messages": LONG,
        "stream": True,
        "max_tokens": 2000,
        "min_tokens": 1500,
    }
    with httpx.stream(
        "POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=60
    ) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in received)
        busy = metric(gateway, "aligngate_engine_unfinished_requests", model=gateway.model)
        assert busy >= 1
    # Closing the response closed the connection mid-stream.
    assert wait_until_idle(gateway) == 0


@pytest.mark.slow
def test_non_streaming_disconnect_aborts_in_the_engine(gateway: Gateway) -> None:
    body = {"model": gateway.model, "messages": LONG, "max_tokens": 2000, "min_tokens": 1500}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=1.0)
    assert wait_until_idle(gateway) == 0
    assert_answers_promptly(gateway)


@pytest.mark.slow
def test_disconnect_storm_leaves_nothing_behind(gateway: Gateway, test_env: dict[str, str]) -> None:
    """vLLM's disconnect test, stricter: 200 streams that would each run 1,500+ tokens, every
    client gone after 0.5 s. Afterwards the engine holds nothing, no completion of the storm
    is stored as finished, and a fresh request is answered within 5 s."""
    storm_started = time.time()
    body = {
        "model": gateway.model,
        "messages": LONG,
        "stream": True,
        "max_tokens": 2000,
        "min_tokens": 1500,
        "store": True,
    }

    async def one(client: httpx.AsyncClient) -> str:
        try:
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    return str(response.status_code)
                async for _ in response.aiter_raw():
                    pass
            return "finished"
        except httpx.TimeoutException:
            return "timed out"

    async def storm() -> list[str]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=gateway.url, timeout=0.5, limits=limits) as client:
            return await asyncio.gather(*(one(client) for _ in range(200)))

    outcomes = asyncio.run(storm())
    counts = {o: outcomes.count(o) for o in set(outcomes)}
    print("storm outcomes:", counts)
    assert counts.get("finished", 0) == 0
    # Past the engine's bound (128 in flight) the rest is refused at once with 429.
    assert set(counts) <= {"timed out", "429"}

    left = wait_until_idle(gateway, timeout=60)
    assert left == 0, f"{left} request(s) still in the engine or the gateway"
    time.sleep(1.5)  # the store's group commit
    storm_over = time.time()
    assert_answers_promptly(gateway)
    store = Store.open(test_env["ALIGNGATE_DATABASE_URL"])
    try:
        with store.engine.connect() as conn:
            rows = conn.execute(
                select(completions.c.status, func.count())
                .where(completions.c.created_at.between(storm_started, storm_over))
                .group_by(completions.c.status)
            )
            stored = dict(rows.all())
    finally:
        store.close()
    print("stored during the storm:", stored)
    assert stored.get("finished", 0) == 0


def test_the_first_chunk_comes_with_the_first_token(gateway: Gateway) -> None:
    """The role chunk waits for the engine's first output (as vLLM's server does), so a client
    that times its first chunk, like vLLM's own `bench serve`, times the first token: the
    first `data:` event with choices arrives no earlier than the server saw the first token."""
    # A long prompt: the engine's prefill takes it a measurable time before the first token.
    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 150)
    labels = {"model": gateway.model, "endpoint": "/v1/chat/completions"}
    count = metric(gateway, "aligngate_time_to_first_token_seconds_count", **labels)
    total = metric(gateway, "aligngate_time_to_first_token_seconds_sum", **labels)
    body = {
        "model": gateway.model,
        "messages": [{"role": "user", "content": f"Count the foxes: {text}"}],
        "max_tokens": 2,
        "stream": True,
    }
    first_choices_s = None
    events = []
    started = time.perf_counter()
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if first_choices_s is None and line.startswith("data: {") and '"choices":[{' in line:
                first_choices_s = time.perf_counter() - started
            if line.startswith("data: "):
                events.append(line)
    assert first_choices_s is not None and events[-1] == "data: [DONE]"
    assert '"role":"assistant"' in events[0]  # still the first event, as OpenAI's
    assert metric(gateway, "aligngate_time_to_first_token_seconds_count", **labels) == count + 1
    server_ttft = metric(gateway, "aligngate_time_to_first_token_seconds_sum", **labels) - total
    assert server_ttft > 0.02  # a real prefill, so the order below is not a coincidence
    assert first_choices_s >= server_ttft
