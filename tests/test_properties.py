"""Property tests (Hypothesis): the renderer never lets user text become a control token, in
any family, for generated conversations; and the feedback store behaves like a simple model of
it under any sequence of calls (stateful test of its HTTP API)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from server.app import build_app
from server.guards.auth import key_id_for
from server.models.render import Message, Renderer
from server.settings import Settings
from tests.test_render import INJECTIONS, build_renderers
from tests.test_store import completion

FAMILIES = ["cut", "kto", "quark", "dpo", "chat"]
PLAIN = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs"], exclude_characters="\x00"),
    max_size=40,
)


@st.composite
def text_with_markers(draw: st.DrawFn) -> tuple[str, str]:
    """(text with control markers injected, the same text without them)."""
    pieces = draw(st.lists(st.tuples(PLAIN, st.sampled_from(["", *INJECTIONS])), max_size=5))
    dirty = "".join(text + marker for text, marker in pieces)
    clean = "".join(text for text, _ in pieces)
    return dirty, clean


@pytest.fixture(scope="module")
def renderers(tiny_dir: Path) -> dict[str, Renderer]:
    return build_renderers(tiny_dir)


@pytest.mark.parametrize("family", FAMILIES)
def test_injected_markers_never_add_control_tokens(
    renderers: dict[str, Renderer], family: str
) -> None:
    renderer = renderers[family]

    @settings(
        max_examples=150,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(turns=st.lists(text_with_markers(), min_size=1, max_size=5 if family != "quark" else 1))
    def check(turns: list[tuple[str, str]]) -> None:
        roles = ["user", "assistant"]
        # A conversation ends with a user turn; blank turns are filled so every family accepts it.
        dirty = [Message(roles[i % 2], d or "x") for i, (d, _) in enumerate(turns)]
        clean = [Message(roles[i % 2], c or "x") for i, (_, c) in enumerate(turns)]
        if dirty[-1].role != "user":
            dirty, clean = dirty[:-1] or dirty, clean[:-1] or clean
        dirty_ids = renderer.render_chat(dirty).token_ids
        clean_ids = renderer.render_chat(clean).token_ids
        assert renderer.count_control_ids(dirty_ids) == renderer.count_control_ids(clean_ids)

    check()


ALICE = "alice-stateful-0123456789"
BOB = "bob-stateful-0123456789ab"
ADMIN = "admin-stateful-0123456789"


class FeedbackApiMachine(RuleBasedStateMachine):
    """The feedback API — the whole app over ASGI (keys, limits, routes, store on SQLite;
    no engine is needed to judge stored completions) — against a dict model: idempotent
    replays return the stored record, a changed payload under a used key is 422, idempotency
    keys are per API key, unknown completions 404, bad choices and empty feedback 400, every
    record carries its caller's key id, listing pages cover everything exactly once, review
    flags set by the admin stick. Each key sees its own: judging another key's completion is
    404 (existence not revealed), a key lists its own feedback, the admin key everyone's."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.folder = Path(tempfile.mkdtemp(prefix="aligngate-stateful-"))
        settings = Settings(
            home=self.folder,
            database_url=f"sqlite:///{self.folder / 'store.db'}",
            adapters_dir=self.folder / "adapters",
            api_keys=f"{ALICE},{BOB}",
            admin_key=ADMIN,
            feedback_per_minute=0,
        )
        self.app = build_app(settings, [])
        self.lifespan = self.app.router.lifespan_context(self.app)
        self.run(self.lifespan.__aenter__())
        transport = httpx.ASGITransport(app=self.app, client=("192.0.2.7", 40000))
        self.http = httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000")
        self.rows: dict[str, tuple[str, dict[str, Any]]] = {}  # id -> (API key, payload)
        self.by_key: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
        self.reviewed: set[str] = set()
        self.owners = {"c1": ALICE, "c2": BOB}  # whose stored completion each is

    def run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)

    def call(self, method: str, path: str, key: str, **kwargs: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {key}"}
        return self.run(self.http.request(method, path, headers=headers, **kwargs))

    @initialize()
    def completions(self) -> None:
        store = self.app.state.store
        for cid, owner in self.owners.items():
            record = completion(cid, n=2, key_id=key_id_for(owner))
            store.record_completion(record).result(timeout=10)

    @rule(
        cid=st.sampled_from(["c1", "c2", "missing"]),
        choice=st.integers(0, 2),
        rating=st.sampled_from([None, -1, 1, 3]),
        judgment=st.sampled_from([None, "too long", "wrong city"]),
        annotator=st.sampled_from([None, "ana"]),
        idempotency_key=st.sampled_from([None, "k1", "k2"]),
        key=st.sampled_from([ALICE, BOB]),
    )
    def post(self, cid, choice, rating, judgment, annotator, idempotency_key, key):  # type: ignore[no-untyped-def]
        body = {"completion_id": cid, "choice_index": choice, "rating": rating}
        body |= {"judgment": judgment, "annotator": annotator}
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        response = self.call("POST", "/v1/feedback", key, json=body)
        error = response.json().get("error") if response.status_code >= 400 else None
        payload = {k: v for k, v in body.items() if k != "idempotency_key"}
        used = self.by_key.get((key, idempotency_key)) if idempotency_key else None
        if rating is None and judgment is None:
            assert response.status_code == 400, response.text
        elif used is not None:
            if used[1] == payload:
                assert response.status_code == 200 and response.json()["id"] == used[0]
            else:
                assert response.status_code == 422 and error["param"] == "idempotency_key"
        elif self.owners.get(cid) != key:  # missing, or another key's: the same 404
            assert response.status_code == 404 and error["param"] == "completion_id"
            assert "another" not in error["message"]
        elif choice >= 2:
            assert response.status_code == 400 and error["param"] == "choice_index"
        else:
            assert response.status_code == 201, response.text
            row = response.json()
            assert row["key_id"] == key_id_for(key) and row["annotator"] == annotator
            self.rows[row["id"]] = (key, payload)
            if idempotency_key is not None:
                self.by_key[(key, idempotency_key)] = (row["id"], payload)
        if error is not None:
            assert set(error) == {"message", "type", "param", "code"}

    @precondition(lambda self: bool(self.rows))
    @rule(data=st.data())
    def review(self, data: st.DataObject) -> None:
        chosen = data.draw(st.sets(st.sampled_from(sorted(self.rows)), min_size=1))
        flag = data.draw(st.booleans())
        body = {"ids": sorted(chosen), "reviewed": flag}
        assert self.call("POST", "/admin/feedback/review", ALICE, json=body).status_code == 403
        response = self.call("POST", "/admin/feedback/review", ADMIN, json=body)
        assert response.status_code == 200 and response.json()["updated"] == len(chosen)
        self.reviewed = self.reviewed | chosen if flag else self.reviewed - chosen

    def listing(self, key: str) -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": 3}
        while True:
            page = self.call("GET", "/v1/feedback", key, params=params).json()
            seen += page["data"]
            if page["next_cursor"] is None:
                return seen
            params["after"] = page["next_cursor"]

    @invariant()
    def listing_matches_the_model(self) -> None:
        bobs = self.listing(BOB)
        assert sorted(r["id"] for r in bobs) == sorted(
            i for i, (k, _) in self.rows.items() if k == BOB
        )
        seen = self.listing(ADMIN)
        assert sorted(r["id"] for r in seen) == sorted(self.rows)
        assert {r["id"] for r in seen if r["reviewed"]} == self.reviewed
        for r in seen:
            key, payload = self.rows[r["id"]]
            assert r["key_id"] == key_id_for(key)
            assert {k: r[k] for k in payload} == payload

    def teardown(self) -> None:
        self.run(self.http.aclose())
        self.run(self.lifespan.__aexit__(None, None, None))
        self.loop.close()
        shutil.rmtree(self.folder, ignore_errors=True)


FeedbackApiMachine.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=15,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
test_feedback_api_is_a_simple_model = FeedbackApiMachine.TestCase
