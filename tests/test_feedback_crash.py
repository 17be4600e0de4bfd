"""Crash test: 200 concurrent feedback POSTs, kill -9 partway, restart on the same store:
every feedback that got a 2xx is there, none twice."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway, kill_gateway, start_gateway, stop_gateway

TOTAL = 200


async def post_all(url: str, completion_id: str, gateway: Gateway | None) -> dict[str, Any]:
    """Send TOTAL feedback POSTs at once; kill the gateway (if given) once a quarter of them
    are acknowledged. Returns idempotency key → (status, body) for those answered."""
    answered: dict[str, Any] = {}
    acked = 0
    killed = asyncio.Event()
    limits = httpx.Limits(max_connections=TOTAL, max_keepalive_connections=TOTAL)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def one(i: int) -> None:
            nonlocal acked
            # Spread the starts over ~2 s so the kill lands while writes are still arriving
            # (all at once, one group commit could acknowledge every one of them).
            await asyncio.sleep(i * 0.01)
            key = f"crash-{i}"
            body = {
                "completion_id": completion_id,
                "judgment": f"judgment {i}",
                "idempotency_key": key,
                "annotator": "crash-test",
            }
            try:
                response = await client.post("/v1/feedback", json=body)
            except httpx.HTTPError:
                return  # the server died before answering: no promise was made
            answered[key] = (response.status_code, response.json())
            if response.status_code in (200, 201):
                acked += 1
                if gateway is not None and acked >= TOTAL // 4 and not killed.is_set():
                    killed.set()
                    kill_gateway(gateway)

        await asyncio.gather(*(one(i) for i in range(TOTAL)))
    return answered


def all_feedback(url: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 1000}
        if cursor:
            params["after"] = cursor
        page = httpx.get(f"{url}/v1/feedback", params=params, timeout=30).json()
        rows += page["data"]
        cursor = page["next_cursor"]
        if not cursor:
            return rows


@pytest.mark.slow
def test_acknowledged_feedback_survives_kill_9(
    test_env: dict[str, str],
    tmp_path,
    default_model_path,  # type: ignore[no-untyped-def]
) -> None:
    env = dict(test_env, ALIGNGATE_DATABASE_URL=f"sqlite:///{tmp_path / 'crash.db'}")
    first = start_gateway([], tmp_path / "first.log", env)
    try:
        reply = httpx.post(
            f"{first.url}/v1/chat/completions",
            json={
                "model": first.model,
                "max_tokens": 8,
                "messages": [{"role": "user", "content": "Say something."}],
            },
            timeout=60,
        ).json()
        answered = asyncio.run(post_all(first.url, reply["id"], first))
    finally:
        kill_gateway(first)
    acked = {key: body["id"] for key, (status, body) in answered.items() if status in (200, 201)}
    assert TOTAL // 4 <= len(acked) < TOTAL, "the kill should land partway"
    assert not [s for s, _ in answered.values() if s >= 500]

    second = start_gateway([], tmp_path / "second.log", env)
    try:
        rows = all_feedback(second.url)
        stored = {r["id"] for r in rows}
        assert set(acked.values()) <= stored  # every acknowledged write survived
        keys = [r["judgment"] for r in rows]
        assert len(keys) == len(set(keys))  # nothing stored twice
        # Clients retry everything with the same keys: acknowledged ones replay (200, same
        # id), lost ones are stored now (201); the store ends with exactly one row each.
        retried = asyncio.run(post_all(second.url, reply["id"], None))
        for key, feedback_id in acked.items():
            status, body = retried[key]
            assert (status, body["id"]) == (200, feedback_id)
        assert {s for s, _ in retried.values()} <= {200, 201}
        final = all_feedback(second.url)
        assert len(final) == TOTAL == len({r["judgment"] for r in final})
    finally:
        assert stop_gateway(second) == 0
    assert os.path.exists(tmp_path / "crash.db")
