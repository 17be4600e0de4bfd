"""Text the store cannot keep — NUL, which PostgreSQL refuses in text, and unpaired UTF-16
surrogates, which no UTF-8 database can encode — is a 400 naming its field, on every route
that stores or looks up client text, on SQLite and PostgreSQL alike (issue 32, item 4).
Before, NUL in some fields reached PostgreSQL and came back as a 503, SQLite kept it, and a
surrogate failed on both as a 503. A refused request stores nothing, and the good requests
sharing its group commit are kept.

The whole app runs in-process over ASGI on the real store (no engine: a request's text is
checked before it reaches a model)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.app import build_app
from server.errors import InvalidRequest, NotFound
from server.guards.auth import LOOPBACK_KEY_ID
from server.settings import Settings
from server.store import Store
from server.store.records import FeedbackCreate
from tests.test_store import completion

NUL = "\x00"
SURROGATE = "\ud800"  # JSON can carry it ("\ud800"); UTF-8 cannot
MESSAGES = [{"role": "user", "content": "Hi"}]
JSON_TYPE = {"content-type": "application/json"}


def _json(body: dict[str, Any]) -> str:
    """As a client sends it: JSON escapes (``\\ud800``), so any text can travel."""
    return json.dumps(body)


@pytest.fixture
async def http(store_url: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(home=tmp_path, database_url=store_url, adapters_dir=tmp_path / "adapters")
    app = build_app(settings, [])
    async with app.router.lifespan_context(app):
        store: Store = app.state.store
        for cid in ("c1", "c2"):
            # Keyless loopback callers are one tenant: these are theirs.
            record = completion(cid, key_id=LOOPBACK_KEY_ID)
            store.record_completion(record).result(timeout=10)
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as c:
            c.app = app  # type: ignore[attr-defined]
            yield c


def _bodies(bad: str) -> list[tuple[str, str, dict[str, Any], str]]:
    """(method, path, JSON body, the field the error must name) for each stored field."""
    feedback = {"completion_id": "c1", "rating": 1}
    return [
        ("POST", "/v1/feedback", {"completion_id": "c1", "judgment": f"bad{bad}"}, "judgment"),
        ("POST", "/v1/feedback", {**feedback, "annotator": f"ana{bad}"}, "annotator"),
        ("POST", "/v1/feedback", {**feedback, "idempotency_key": f"k{bad}"}, "idempotency_key"),
        ("POST", "/v1/feedback", {"completion_id": f"c1{bad}", "rating": 1}, "completion_id"),
        ("POST", "/v1/feedback", {**feedback, "preferred_over": f"c2{bad}"}, "preferred_over"),
        ("POST", "/v1/chat/completions/c1", {"metadata": {"k": f"v{bad}"}}, "metadata"),
        ("POST", "/v1/chat/completions/c1", {"metadata": {f"k{bad}": "v"}}, "metadata"),
        (
            "POST",
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": f"a{bad}b"}]},
            "messages.0.content",
        ),
        (
            "POST",
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": "a", "name": f"n{bad}"}]},
            "messages.0.name",
        ),
        ("POST", "/v1/chat/completions", {"model": f"m{bad}", "messages": MESSAGES}, "model"),
        ("POST", "/v1/chat/completions", {"model": "m", "messages": MESSAGES, "user": bad}, "user"),
        (
            "POST",
            "/v1/chat/completions",
            {"model": "m", "messages": MESSAGES, "stop": [f"s{bad}"]},
            "stop",
        ),
        (
            "POST",
            "/v1/chat/completions",
            {"model": "m", "messages": MESSAGES, "metadata": {"k": bad}},
            "metadata",
        ),
        ("POST", "/v1/completions", {"model": "m", "prompt": f"p{bad}"}, "prompt"),
        ("POST", "/v1/completions", {"model": "m", "prompt": [f"p{bad}"]}, "prompt"),
        ("POST", "/v1/arena/battles", {"messages": MESSAGES, "models": ["a", f"b{bad}"]}, "models"),
        ("POST", "/v1/arena/battles/b1/vote", {"winner": "a", "annotator": bad}, "annotator"),
        ("POST", "/admin/feedback/review", {"ids": [f"f{bad}"]}, "ids"),
        ("POST", "/admin/promote", {"alias": f"m{bad}", "version": "v"}, "alias"),
        ("POST", "/admin/promote", {"alias": "m", "version": f"v{bad}"}, "version"),
        ("POST", "/admin/align", {"model": f"m{bad}"}, "model"),
        ("POST", "/admin/align", {"model": "m", "since": f"1{bad}"}, "since"),
        ("POST", "/v1/render", {"model": "m", "prompt": f"p{bad}"}, "prompt"),
        ("POST", "/v1/render", {"model": f"m{bad}", "prompt": "p"}, "model"),
    ]


# Looked up, not stored: a NUL in a path or a query parameter (percent-encoded).
LOOKUPS = [
    ("/v1/completions/c1%00", "completion_id"),
    ("/v1/chat/completions/c1%00", "completion_id"),
    ("/v1/chat/completions/c1%00/messages", "completion_id"),
    ("/v1/arena/battles/b1%00", "battle_id"),
    ("/v1/feedback?model=m%00", "model"),
    ("/v1/feedback?after=f%00", "after"),
    ("/v1/feedback?since=1%00", "since"),
    ("/v1/chat/completions?model=m%00", "model"),
    ("/v1/leaderboard?anchor=m%00", "anchor"),
    ("/admin/export?format=cut&model=m%00", "model"),
    ("/admin/align/j%00", "job_id"),
]


async def _stored(client: httpx.AsyncClient) -> tuple[int, dict[str, str]]:
    store: Store = client.app.state.store  # type: ignore[attr-defined]
    rows, _ = await store.list_feedback()
    record, _ = await store.get_completion("c1")
    return len(rows), dict(record.metadata or {})


@pytest.mark.parametrize("bad", [NUL, SURROGATE], ids=["nul", "surrogate"])
async def test_item_4_text_the_store_cannot_keep_is_a_400_naming_its_field(
    http: httpx.AsyncClient, bad: str
) -> None:
    before = await _stored(http)
    wrong = []  # every route that answered otherwise, so one run shows them all
    for method, path, body, field in _bodies(bad):
        r = await http.request(method, path, content=_json(body), headers=JSON_TYPE)
        error = r.json().get("error") or {}
        if not (
            r.status_code == 400
            and error["type"] == "invalid_request_error"
            and (error["param"] == field or str(error["param"]).startswith(f"{field}."))
            and ("NUL" in error["message"] or "surrogate" in error["message"])
        ):
            wrong.append((method, path, field, r.status_code, error.get("message")))
    if bad == NUL:
        for path, field in LOOKUPS:
            for method in ("GET", "DELETE") if "chat/completions/c1" in path else ("GET",):
                r = await http.request(method, path)
                if r.status_code == 405:
                    continue
                error = r.json().get("error") or {}
                if r.status_code != 400 or error.get("param") != field:
                    wrong.append((method, path, field, r.status_code, error.get("message")))
    assert not wrong, "\n".join(map(str, wrong))
    assert await _stored(http) == before  # nothing was stored


async def test_item_4_a_bad_request_in_a_group_commit_leaves_its_siblings(
    http: httpx.AsyncClient,
) -> None:
    good = [{"completion_id": "c1", "judgment": f"fine {i}"} for i in range(6)]
    bad = [{"completion_id": "c1", "judgment": f"bad{c}"} for c in (NUL, SURROGATE)]
    replies = await asyncio.gather(
        *(
            http.post("/v1/feedback", content=_json(body), headers=JSON_TYPE)
            for body in [*good[:3], *bad, *good[3:]]
        )
    )
    assert [r.status_code for r in replies] == [201] * 3 + [400] * 2 + [201] * 3
    store: Store = http.app.state.store  # type: ignore[attr-defined]
    rows, _ = await store.list_feedback()
    assert sorted(r.judgment for r in rows) == sorted(g["judgment"] for g in good)


async def test_item_4_the_store_refuses_what_it_cannot_keep_from_any_caller(
    store_url: str,
) -> None:
    """Text that did not come through a request model (an AI judge's reply, a header) is
    refused by the store itself, as the same client error on both databases, and the
    writes queued beside it commit."""
    store = Store.open(store_url)
    try:
        store.record_completion(completion("c1")).result(timeout=10)
        texts = ["fine", f"judge said {NUL}", "also fine", f"x{SURROGATE}"]
        outcomes = await asyncio.gather(
            *(store.add_feedback(FeedbackCreate("c1", judgment=t)) for t in texts),
            return_exceptions=True,
        )
        assert [type(o).__name__ for o in outcomes] == [
            "tuple",
            "InvalidRequest",
            "tuple",
            "InvalidRequest",
        ], outcomes
        assert all(o.param == "judgment" for o in outcomes if isinstance(o, InvalidRequest))
        rows, _ = await store.list_feedback()
        assert sorted(r.judgment for r in rows) == ["also fine", "fine"]
        with pytest.raises(InvalidRequest, match="NUL"):
            store.record_completion(completion("c2", prompt=f"P{NUL}")).result(timeout=10)
        with pytest.raises(NotFound):
            await store.get_completion("c2")
    finally:
        store.close()
