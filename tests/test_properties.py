"""Property tests (Hypothesis): the renderer never lets user text become a control token, in
any family, for generated conversations; and the feedback store behaves like a simple model of
it under any sequence of operations (stateful test)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from server.errors import IdempotencyConflict, InvalidRequest, NotFound
from server.render import Message, Renderer
from server.store import FeedbackCreate, Store
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


class FeedbackMachine(RuleBasedStateMachine):
    """The store against a dict model: idempotent replays return the stored row, a changed
    payload under a used key is refused, unknown completions are refused, listing pages
    cover everything exactly once, review flags stick."""

    keys = Bundle("keys")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.folder = Path(tempfile.mkdtemp(prefix="aligngate-stateful-"))
        self.store = Store.open(f"sqlite:///{self.folder / 'store.db'}")
        self.rows: dict[str, FeedbackCreate] = {}  # id -> what was stored
        self.by_key: dict[str, tuple[str, FeedbackCreate]] = {}
        self.reviewed: set[str] = set()

    @initialize()
    def completions(self) -> None:
        for cid in ("c1", "c2"):
            self.store.record_completion(completion(cid, n=2)).result(timeout=10)

    def run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)

    @rule(
        target=keys,
        cid=st.sampled_from(["c1", "c2", "missing"]),
        choice=st.integers(0, 2),
        rating=st.sampled_from([None, -1, 1, 3]),
        judgment=st.sampled_from([None, "too long", "wrong city"]),
        key=st.sampled_from([None, "k1", "k2", "k3"]),
    )
    def add(self, cid, choice, rating, judgment, key):  # type: ignore[no-untyped-def]
        if rating is None and judgment is None:
            judgment = "needs a signal"
        scale = None if rating is None else ("thumbs" if rating in (-1, 1) else "stars")
        fb = FeedbackCreate(
            completion_id=cid,
            choice_index=choice,
            rating=rating,
            rating_scale=scale,
            judgment=judgment,
            idempotency_key=key,
        )
        try:
            row, created = self.run(self.store.add_feedback(fb))
        except NotFound:
            assert cid == "missing"
            return key
        except InvalidRequest:
            assert choice >= 2
            return key
        except IdempotencyConflict:
            assert key in self.by_key and self.by_key[key][1].payload() != fb.payload()
            return key
        assert cid != "missing" and choice < 2
        if key is not None and key in self.by_key:
            assert not created and row.id == self.by_key[key][0]
        else:
            assert created
            self.rows[row.id] = fb
            if key is not None:
                self.by_key[key] = (row.id, fb)
        return key

    @precondition(lambda self: bool(self.rows))
    @rule(data=st.data())
    def review(self, data: st.DataObject) -> None:
        chosen = data.draw(st.sets(st.sampled_from(sorted(self.rows)), min_size=1))
        flag = data.draw(st.booleans())
        assert self.run(self.store.set_reviewed(sorted(chosen), flag)) == len(chosen)
        self.reviewed = self.reviewed | chosen if flag else self.reviewed - chosen

    @invariant()
    def listing_matches_the_model(self) -> None:
        seen, cursor = [], None
        while True:
            page, cursor = self.run(self.store.list_feedback(after=cursor, limit=3))
            seen += page
            if cursor is None:
                break
        assert sorted(r.id for r in seen) == sorted(self.rows)
        assert {r.id for r in seen if r.reviewed} == self.reviewed
        for r in seen:
            stored = self.rows[r.id]
            assert (r.completion_id, r.choice_index, r.judgment, r.rating) == (
                stored.completion_id,
                stored.choice_index,
                stored.judgment,
                stored.rating,
            )

    def teardown(self) -> None:
        self.store.close()
        self.loop.close()
        shutil.rmtree(self.folder, ignore_errors=True)


FeedbackMachine.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=15,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
test_feedback_store_is_a_simple_model = FeedbackMachine.TestCase
