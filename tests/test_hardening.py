"""A gateway configured as in production — API keys, an admin key, a small bound on requests
in flight — driven over loopback HTTP: keys end to end, 429 at 3× capacity, and a SIGTERM
that drains (new requests 503, the running one finishes, the store is flushed, exit 0)."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from server.models.default_model import DEFAULT_MODEL_NAME
from server.store import Store
from tests.conftest import Gateway, start_own_gateway, stop_gateway

ALICE = "alice-0123456789abcdef"
ADMIN = "admin-0123456789abcdef"
BOB = "bob-0123456789abcdef"  # keys file: 3 generation requests a minute
CAROL = "carol-0123456789abcdef"  # keys file: 120 tokens a minute
DAVE = "dave-0123456789abcdef0"  # keys file: 2 requests a minute (renders count)
CAPACITY = 4  # max_pending_requests of the model
FEEDBACK_PER_MINUTE = 5

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hardened(
    test_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    folder = tmp_path_factory.mktemp("hardened")
    keys_file = folder / "keys"
    keys_file.write_text(f"bob {BOB} rpm=3\ncarol {CAROL} tpm=120\ndave {DAVE} rpm=2\n")
    gw = start_own_gateway(
        folder,
        "models:\n"
        f"  - {{name: {DEFAULT_MODEL_NAME}, path: 'builtin:{DEFAULT_MODEL_NAME}', store: true, "
        f"max_pending_requests: {CAPACITY}, max_model_len: 2048, lora: {{}}}}\n",
        test_env,
        {
            "ALIGNGATE_API_KEYS": ALICE,
            "ALIGNGATE_API_KEYS_FILE": str(keys_file),
            "ALIGNGATE_ADMIN_KEY": ADMIN,
            "ALIGNGATE_SHUTDOWN_TIMEOUT_S": "60",
            "ALIGNGATE_FEEDBACK_PER_MINUTE": str(FEEDBACK_PER_MINUTE),
        },
    )
    yield gw
    stop_gateway(gw)


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def metric(gateway: Gateway, name: str, **labels: str) -> float:
    text = httpx.get(f"{gateway.url}/metrics", headers=auth(ADMIN), timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_keys_end_to_end(hardened: Gateway) -> None:
    anonymous = openai.OpenAI(base_url=f"{hardened.url}/v1", api_key="wrong-key-0000000000")
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()
    client = openai.OpenAI(base_url=f"{hardened.url}/v1", api_key=ALICE, max_retries=0)
    reply = client.chat.completions.create(
        model=hardened.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    r = httpx.post(
        f"{hardened.url}/v1/feedback",
        json={"completion_id": reply.id, "judgment": "Say more."},
        headers=auth(ALICE),
    )
    assert r.status_code == 201 and r.json()["key_id"].startswith("key-")
    stored = httpx.get(f"{hardened.url}/v1/completions/{reply.id}", headers=auth(ALICE)).json()
    assert stored["key_id"] == r.json()["key_id"]

    # Each key sees its own: to another key Alice's completion does not exist (404, as a
    # missing one, not 403), nor can it judge it; the admin key sees everything.
    url = f"{hardened.url}/v1/completions/{reply.id}"
    foreign = httpx.get(url, headers=auth(BOB))
    missing = httpx.get(f"{hardened.url}/v1/completions/chatcmpl-nope", headers=auth(BOB))
    assert foreign.status_code == missing.status_code == 404
    assert foreign.json()["error"]["message"].replace(reply.id, "X") == missing.json()["error"][
        "message"
    ].replace("chatcmpl-nope", "X")
    judged = httpx.post(
        f"{hardened.url}/v1/feedback",
        json={"completion_id": reply.id, "judgment": "Poison."},
        headers=auth(BOB),
    )
    assert judged.status_code == 404 and judged.json()["error"]["param"] == "completion_id"
    listed = {k: httpx.get(f"{hardened.url}/v1/feedback", headers=auth(k)).json()["data"]
              for k in (ALICE, BOB, ADMIN)}  # fmt: skip
    assert r.json()["id"] in {f["id"] for f in listed[ALICE]} & {f["id"] for f in listed[ADMIN]}
    assert all(f["key_id"] == "bob" for f in listed[BOB])
    assert httpx.get(url, headers=auth(ADMIN)).status_code == 200

    assert httpx.get(f"{hardened.url}/admin/whoami", headers=auth(ALICE)).status_code == 403
    assert httpx.get(f"{hardened.url}/admin/whoami", headers=auth(ADMIN)).status_code == 200
    assert httpx.get(f"{hardened.url}/admin/whoami").status_code == 401
    assert httpx.get(f"{hardened.url}/health").status_code == 200
    assert httpx.get(f"{hardened.url}/metrics").status_code == 401
    # The log never holds a key.
    log = hardened.log_path.read_text(errors="replace")
    assert ALICE not in log and ADMIN not in log


def test_arena_battles_belong_to_the_key_that_started_them(
    hardened: Gateway, arena_adapter: str
) -> None:
    question = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6}
    battles = f"{hardened.url}/v1/arena/battles"
    alone = httpx.post(battles, json=question, headers=auth(ALICE), timeout=60)
    assert alone.status_code == 409 and "two served models" in alone.json()["error"]["message"]
    loaded = httpx.post(
        f"{hardened.url}/admin/adapters",
        json={"name": "arena:tuned", "path": arena_adapter},
        headers=auth(ADMIN),
        timeout=120,
    )
    assert loaded.status_code == 201, loaded.text
    try:
        started = httpx.post(battles, json=question, headers=auth(ALICE), timeout=120)
        assert started.status_code == 200, started.text
        url = f"{battles}/{started.json()['id']}"
        # To another key the battle does not exist, to read, to vote on, or on its board.
        for response in (
            httpx.get(url, headers=auth(BOB)),
            httpx.post(f"{url}/vote", json={"winner": "a"}, headers=auth(BOB)),
        ):
            assert response.status_code == 404, response.text
        assert httpx.get(url, headers=auth(ADMIN)).json()["status"] == "open"
        voted = httpx.post(f"{url}/vote", json={"winner": "b"}, headers=auth(ALICE))
        assert voted.status_code == 200, voted.text
        assert {voted.json()[s]["model"] for s in "ab"} == {hardened.model, "arena:tuned"}
        again = httpx.post(f"{url}/vote", json={"winner": "a"}, headers=auth(ADMIN))
        assert again.status_code == 409
        mine = httpx.get(f"{hardened.url}/v1/feedback", headers=auth(ALICE)).json()["data"]
        assert voted.json()["preference_id"] in {f["id"] for f in mine}
        board = {
            k: httpx.get(f"{hardened.url}/v1/leaderboard", headers=auth(k), timeout=60).json()
            for k in (ALICE, BOB)
        }
        assert {r["model"] for r in board[ALICE]["data"]} == {hardened.model, "arena:tuned"}
        assert board[BOB]["data"] == [] and board[BOB]["battles"] == 0
    finally:
        httpx.delete(f"{hardened.url}/admin/adapters/arena:tuned", headers=auth(ADMIN))


def test_stored_completions_are_scoped_per_key(hardened: Gateway) -> None:
    """OpenAI's Stored Completions routes: another key's id is a 404 on every route, as a
    missing one; its lists leave the record out; the admin key sees and changes all."""
    sdk = {
        k: openai.OpenAI(base_url=f"{hardened.url}/v1", api_key=k, max_retries=0)
        for k in (ALICE, BOB, ADMIN)
    }
    run = uuid.uuid4().hex
    reply = sdk[ALICE].chat.completions.create(
        model=hardened.model,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=2,
        metadata={"run": run},
    )
    bob = sdk[BOB].chat.completions
    refused = [
        lambda: bob.retrieve(reply.id),
        lambda: bob.messages.list(reply.id),
        lambda: bob.update(reply.id, metadata={"run": "bob"}),
        lambda: bob.delete(reply.id),
        lambda: bob.list(after=reply.id),
    ]
    for call in refused:
        with pytest.raises(openai.NotFoundError) as foreign:
            call()
        with pytest.raises(openai.NotFoundError) as missing:
            bob.retrieve("chatcmpl-nope")
        said = foreign.value.body, missing.value.body
        assert said[0]["message"].replace(reply.id, "X") == (  # type: ignore[index]
            said[1]["message"].replace("chatcmpl-nope", "X")  # type: ignore[index]
        )
    assert list(bob.list(metadata={"run": run})) == []
    mine = sdk[ALICE].chat.completions
    assert [c.id for c in mine.list(metadata={"run": run})] == [reply.id]
    assert mine.retrieve(reply.id).to_dict()["metadata"] == {"run": run}  # Bob changed nothing
    admin = sdk[ADMIN].chat.completions
    assert [c.id for c in admin.list(metadata={"run": run})] == [reply.id]
    assert [m.content for m in admin.messages.list(reply.id)] == ["Hi"]
    assert admin.update(reply.id, metadata={"run": run, "seen": "admin"}).id == reply.id
    assert mine.retrieve(reply.id).to_dict()["metadata"] == {"run": run, "seen": "admin"}
    assert admin.delete(reply.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        mine.retrieve(reply.id)


def test_feedback_is_rate_limited_per_key(hardened: Gateway) -> None:
    client = openai.OpenAI(base_url=f"{hardened.url}/v1", api_key=ALICE, max_retries=0)
    reply = client.chat.completions.create(
        model=hardened.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    statuses = []
    for i in range(FEEDBACK_PER_MINUTE + 1):
        r = httpx.post(
            f"{hardened.url}/v1/feedback",
            json={"completion_id": reply.id, "rating": 1, "idempotency_key": f"k{i}"},
            headers=auth(ALICE),
        )
        statuses.append(r.status_code)
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert statuses[-1] == 429 and statuses.count(201) >= FEEDBACK_PER_MINUTE - 1
    # Another key has its own bucket.
    other = httpx.post(
        f"{hardened.url}/v1/feedback",
        json={"completion_id": reply.id, "rating": 1},
        headers=auth(ADMIN),
    )
    assert other.status_code == 201


def chat(gateway: Gateway, key: str, max_tokens: int) -> httpx.Response:
    body = {
        "model": gateway.model,
        "messages": [{"role": "user", "content": "Count to a thousand."}],
        "max_tokens": max_tokens,
        "min_tokens": max_tokens,
    }
    url = f"{gateway.url}/v1/chat/completions"
    return httpx.post(url, json=body, headers=auth(key), timeout=60)


def test_generation_is_rate_limited_per_key_by_requests_and_tokens(hardened: Gateway) -> None:
    before = metric(hardened, "aligngate_rejected_requests_total", reason="rate_limited")
    # bob: rpm=3 in the keys file.
    assert [chat(hardened, BOB, 2).status_code for _ in range(3)] == [200] * 3
    refused = chat(hardened, BOB, 2)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert "3 generation requests per minute" in error["message"]
    # carol: tpm=120. The first request's prompt fits; its 100 completion tokens are charged
    # when it ends, which leaves her in debt: the next one waits.
    first = chat(hardened, CAROL, 100)
    assert first.status_code == 200
    assert first.json()["usage"]["total_tokens"] > 120
    second = chat(hardened, CAROL, 2)
    assert second.status_code == 429
    assert "120 tokens per minute" in second.json()["error"]["message"]
    assert int(second.headers["retry-after"]) >= 5
    # Other keys keep their own budgets; the admin key has none.
    assert chat(hardened, ALICE, 2).status_code == 200
    assert all(chat(hardened, ADMIN, 1).status_code == 200 for _ in range(4))
    after = metric(hardened, "aligngate_rejected_requests_total", reason="rate_limited")
    assert after - before == 2


def test_item_10_render_is_rate_limited_and_off_the_event_loop(hardened: Gateway) -> None:
    """Issue 32, item 10: ``/v1/render`` counts against the key's requests per minute (it
    had no limit: one key could keep the gateway's CPU rendering), and rendering runs on the
    tokenizing thread, so a long render does not hold up other requests."""
    url = f"{hardened.url}/v1/render"
    body = {"model": DEFAULT_MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}]}
    before = metric(hardened, "aligngate_rejected_requests_total", reason="rate_limited")
    statuses = [httpx.post(url, json=body, headers=auth(DAVE), timeout=30) for _ in range(3)]
    assert [r.status_code for r in statuses] == [200, 200, 429]
    assert statuses[2].json()["error"]["code"] == "rate_limit_exceeded"
    assert int(statuses[2].headers["retry-after"]) >= 1
    after = metric(hardened, "aligngate_rejected_requests_total", reason="rate_limited")
    assert after - before == 1

    long = {  # ~1.5 MB of text: seconds of templating and tokenization
        "model": DEFAULT_MODEL_NAME,
        "messages": [{"role": "user", "content": "word " * 39_000} for _ in range(8)],
    }

    async def race() -> list[str]:
        done: list[str] = []
        async with httpx.AsyncClient(timeout=120, headers=auth(ALICE)) as client:

            async def render() -> None:
                response = await client.post(url, json=long)
                assert response.status_code == 200, response.text[:500]
                done.append("render")

            async def health() -> None:
                await asyncio.sleep(0.3)  # the render has started
                assert (await client.get(f"{hardened.url}/health")).status_code == 200
                done.append("health")

            await asyncio.gather(render(), health())
        return done

    assert asyncio.run(race()) == ["health", "render"]


async def _stream(client: httpx.AsyncClient, url: str, max_tokens: int) -> tuple[int, float, str]:
    started = time.perf_counter()
    body = {
        "model": DEFAULT_MODEL_NAME,
        "messages": [{"role": "user", "content": "Count to a thousand."}],
        "max_tokens": max_tokens,
        "min_tokens": max_tokens,
        "stream": True,
    }
    async with client.stream("POST", url, json=body, headers=auth(ALICE)) as response:
        text = (await response.aread()).decode()
        retry = response.headers.get("retry-after", "")
        return response.status_code, time.perf_counter() - started, retry or text[-20:]


async def burst(gateway: Gateway, n: int, max_tokens: int) -> list[tuple[int, float, str]]:
    async with httpx.AsyncClient(timeout=120) as client:
        url = f"{gateway.url}/v1/chat/completions"
        return await asyncio.gather(*(_stream(client, url, max_tokens) for _ in range(n)))


def test_three_times_capacity_gets_429_fast_and_no_hang(hardened: Gateway) -> None:
    before = metric(hardened, "aligngate_rejected_requests_total", reason="overloaded")
    results = asyncio.run(burst(hardened, 3 * CAPACITY, max_tokens=48))
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    print(
        f"{len(results)} requests at capacity {CAPACITY}: {len(ok)} served "
        f"(max {max(r[1] for r in ok):.2f} s), {len(refused)} refused "
        f"(max {max(r[1] for r in refused):.3f} s)"
    )
    assert len(ok) == CAPACITY and len(refused) == 2 * CAPACITY
    assert all(r[2] == "1" for r in refused)  # Retry-After
    assert all(r[2].endswith("[DONE]\n\n") for r in ok)
    assert max(r[1] for r in refused) < 5
    after = metric(hardened, "aligngate_rejected_requests_total", reason="overloaded")
    assert after - before == 2 * CAPACITY
    # Every slot came back: a full set of requests is admitted again.
    again = asyncio.run(burst(hardened, CAPACITY, max_tokens=8))
    assert [r[0] for r in again] == [200] * CAPACITY


def test_ui_shows_admin_actions_only_with_the_admin_key(hardened: Gateway, browser) -> None:  # type: ignore[no-untyped-def]
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        page.goto(f"{hardened.url}/ui/feedback")
        page.get_by_text("Keys").click()
        page.get_by_label("API key").fill(ALICE)
        page.get_by_role("button", name="Save").click()
        page.wait_for_load_state("networkidle")
        assert "Could not" not in page.locator("#status").inner_text()  # the key reads
        assert page.locator("#exports").is_hidden()
        page.get_by_label("Admin key").fill(ADMIN)
        page.get_by_role("button", name="Save").click()
        page.get_by_role("button", name="Download cut").wait_for()
        # Kept for this browser session only.
        stored = page.evaluate("[sessionStorage.length, localStorage.length]")
        assert stored == [2, 0]
    finally:
        context.close()


def test_sigterm_drains_then_exits_zero(hardened: Gateway, test_env: dict[str, str]) -> None:
    """Last in this module: it stops the gateway."""
    first_chunk = threading.Event()
    outcome: dict[str, object] = {}

    def long_stream() -> None:
        body = {
            "model": DEFAULT_MODEL_NAME,
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 96,
            "min_tokens": 96,
            "stream": True,
        }
        with httpx.stream(
            "POST",
            f"{hardened.url}/v1/chat/completions",
            json=body,
            headers=auth(ALICE),
            timeout=120,
        ) as response:
            chunks = []
            for line in response.iter_lines():
                if line.startswith("data: "):
                    chunks.append(line)
                    first_chunk.set()
            outcome["status"] = response.status_code
            outcome["chunks"] = chunks

    worker = threading.Thread(target=long_stream)
    worker.start()
    assert first_chunk.wait(60)
    signalled = time.perf_counter()
    hardened.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    refused = httpx.get(f"{hardened.url}/v1/models", headers=auth(ALICE), timeout=10)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
    assert refused.json()["error"]["code"] == "shutting_down"
    assert httpx.get(f"{hardened.url}/health", timeout=10).status_code == 503

    worker.join(120)
    code = hardened.process.wait(timeout=60)
    elapsed = time.perf_counter() - signalled
    print(f"SIGTERM → exit {code} in {elapsed:.2f} s, the running stream finished")
    assert code == 0
    chunks = outcome["chunks"]
    assert outcome["status"] == 200 and chunks[-1] == "data: [DONE]"  # type: ignore[index]
    assert '"finish_reason":"length"' in "".join(chunks)  # type: ignore[arg-type]

    # The store was flushed: the finished stream's record is on disk.
    completion_id = chunks[0].split('"id":"', 1)[1].split('"', 1)[0]  # type: ignore[index]
    db = Path(str(hardened.log_path.parent / "store.db"))
    store = Store.open(f"sqlite:///{db}")
    try:
        record, _ = asyncio.run(store.get_completion(completion_id))
    finally:
        store.close()
    assert record.status == "finished" and record.completion_tokens == 96
