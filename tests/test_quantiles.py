"""Quark's reward quantiles (``server/feedback/quantiles.py``), on cases checked by hand, and
the ``quark`` export in ALT's data-pool format."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.feedback.export import QUANTILE_TOKENS, build_export
from server.feedback.quantiles import assign_quantiles, quantile_pools
from server.store import ChoiceRecord, CompletionRecord, FeedbackRow

K = 5


@dataclass(frozen=True)
class Item:
    prompt: str
    reward: float


def test_a_lone_thumbs_down_gets_the_worst_token_never_the_best() -> None:
    assert assign_quantiles([0.0], K) == [4]
    assert quantile_pools([Item("p", 0.0)], K) == [4]
    assert assign_quantiles([0.0, 1.0], K) == [4, 4]  # fewer than K: all worst (ALT)


def test_at_least_k_rewards_split_into_equal_groups_remainder_to_the_last() -> None:
    # Best first: 0.7, 0.6, 0.5, 0.4 | 0.3, 0.2, 0.1 → groups of 1, 1, 1, 1, 3.
    assert assign_quantiles([0.3, 0.7, 0.1, 0.6, 0.5, 0.2, 0.4], K) == [4, 0, 4, 1, 2, 4, 3]
    # 12: groups of 12 // 5 = 2, the 2 left over to the last group.
    twelve = assign_quantiles([float(r) for r in range(12)], K)
    assert twelve[::-1] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 4, 4]


def test_ties_share_the_quantile_of_their_middle_position() -> None:
    # Positions: 0.9 @0 → 0; 0.5 @1..3, middle 2 → 2; 0.1 @4 → 4; 0.0 @5 → min(5, 4) = 4.
    assert assign_quantiles([0.5, 0.9, 0.0, 0.5, 0.1, 0.5], K) == [2, 0, 4, 2, 4, 2]
    # One thumbs-up, nine thumbs-down: groups of 2; the downs sit at 1..9, middle 5 → 2.
    assert assign_quantiles([1.0] + [0.0] * 9, K) == [0] + [2] * 9
    # Nine up, one down: the ups at 0..8, middle 4 → 2; the down at 9 → 4.
    assert assign_quantiles([1.0] * 9 + [0.0], K) == [2] * 9 + [4]


def test_a_pool_of_equal_rewards_gets_the_worst_token() -> None:
    assert assign_quantiles([0.0] * 10, K) == [4] * 10
    assert assign_quantiles([1.0] * 7, K) == [4] * 7


def test_k_must_be_positive() -> None:
    with pytest.raises(ValueError):
        assign_quantiles([0.5], 0)


@given(st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0, -3.0]), max_size=40))
def test_monotone_and_ties_shared(rewards: list[float]) -> None:
    q = assign_quantiles(rewards, K)
    assert all(0 <= x < K for x in q)
    for i, a in enumerate(rewards):
        for j, b in enumerate(rewards):
            if a > b:
                assert q[i] <= q[j]  # a lower reward never gets a better token
            elif a == b:
                assert q[i] == q[j]
    if len(set(rewards)) > 1:  # the lowest reward is never the best token
        assert min(q[i] for i, r in enumerate(rewards) if r == min(rewards)) > 0


def test_prompts_with_fewer_than_k_answers_are_pooled_over_the_window() -> None:
    items = [
        Item("B", 0.0),
        *(Item("A", r) for r in (1.0, 0.8, 0.6, 0.4, 0.2)),  # K answers: a pool of its own
        Item("C", 1.0),
        Item("D", 0.75),
        Item("C", 0.5),
        Item("D", 0.25),
    ]
    # A: 0..4 by itself. B, C, D: one pool of 5 — 1.0, 0.75, 0.5, 0.25, 0.0 → 0..4.
    assert quantile_pools(items, K) == [4, 0, 1, 2, 3, 4, 0, 1, 2, 3]
    # Without D the window pool has 3 (< K): all worst; A is unaffected.
    assert quantile_pools([i for i in items if i.prompt != "D"], K) == [4, 0, 1, 2, 3, 4, 4, 4]


def _record(cid: str, question: str, answers: list[str]) -> CompletionRecord:
    return CompletionRecord(
        id=cid,
        created_at=time.time(),
        endpoint="chat",
        model="m",
        family="chat",
        template_fingerprint="f",
        request=[{"role": "user", "content": question}],
        prompt_text=f"<user>{question}<assistant>",
        sampling={},
        choices=[ChoiceRecord(i, a, "stop") for i, a in enumerate(answers)],
        prompt_tokens=5,
        completion_tokens=5,
        latency_ms=1.0,
    )


_SEQ = iter(range(1, 1_000_000))


def _fb(cid: str, index: int, **fields: object) -> FeedbackRow:
    seq = next(_SEQ)
    values: dict = dict(
        id=f"fb-{seq}", seq=seq, created_at=time.time(), completion_id=cid, choice_index=index,
        model="m", judgment=None, rating=None, rating_scale=None, label=None,
        preferred_over=None, annotator=None, key_id="k", idempotency_key=None, payload_hash="h",
    )  # fmt: skip
    values.update(fields)
    return FeedbackRow(**values)


def test_quark_export_is_alts_data_pool() -> None:
    six = [f"four ({i})" for i in range(6)]
    records = {
        "six": _record("six", "Sum 2+2.", six),
        "down": _record("down", "Name a colour.", ["Blue."]),
        "hi": _record("hi", "Say hi.", ["Hi!", "Go away."]),
    }
    rows = [
        _fb("six", 5, rating=5, rating_scale="stars"),  # superseded by the 1 star below
        *(_fb("six", i, rating=r, rating_scale="stars") for i, r in enumerate([5, 4, 4, 3, 2])),
        _fb("down", 0, rating=-1, rating_scale="thumbs"),
        _fb("six", 5, rating=1, rating_scale="stars"),
        _fb("hi", 0, explicit_reward=0.9),  # an explicit reward alone is a verdict
        _fb("hi", 1, judgment="Rude."),  # no reward: not in Quark's pool
    ]
    items, report = build_export("quark", rows, records)
    t = QUANTILE_TOKENS
    assert items == [
        {
            # 6 ≥ K answers, split on their own: 1.0 @0 → 0; 0.75 @1..2 (middle 1) → 1;
            # 0.5 @3 → 3; 0.25 @4 and 0.0 @5 → 4 (the remainder to the last).
            "prompt": "Sum 2+2.",
            "generations": six,
            "rewards": [1.0, 0.75, 0.75, 0.5, 0.25, 0.0],
            "quantile_tokens": [t[0], t[1], t[1], t[3], t[4], t[4]],
            "quantiles": [0, 1, 1, 3, 4, 4],
        },
        # The other prompts pool over the window: 2 rewards < K, so both get the worst.
        {
            "prompt": "Name a colour.",
            "generations": ["Blue."],
            "rewards": [0.0],
            "quantile_tokens": [t[4]],
            "quantiles": [4],
        },
        {
            "prompt": "Say hi.",
            "generations": ["Hi!"],
            "rewards": [0.9],
            "quantile_tokens": [t[4]],
            "quantiles": [4],
        },
    ]
    assert (report.records, report.superseded) == (3, 1)
