"""Arena battles in the store (SQLite and PostgreSQL) and the leaderboard built from them: one
vote per battle, a decisive vote as a DPO pair when the prompts match, ties and both-bad kept
as outcomes, tenancy, sources, and the leaderboard's filter, anchor and errors."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from server.errors import Conflict, InvalidRequest, NotFound, NotRateable
from server.evaluation.arena import leaderboard
from server.feedback.export import build_export
from server.store import BattleCreate, Store, judge_source
from server.store.battles import DIFFERENT_PROMPTS
from tests.test_store import completion

ALICE, BOB = "alice", "bob"


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = Store.open(store_url)
    yield s
    s.close()


async def battle(store: Store, a: str, b: str, *, prompt: str = "P", key: str = ALICE) -> str:
    """An open battle between stored answers of models ``a`` and ``b`` to ``prompt``."""
    ids = []
    for model in (a, b):
        record = completion(f"c-{model}-{prompt}", prompt=prompt, model=model, key_id=key)
        if model.startswith("other-template"):
            record.prompt_text = f"[INST] {prompt} [/INST]"
        store.record_completion(record).result(timeout=10)
        ids.append(record.id)
    row = await store.record_battle(
        BattleCreate(
            model_a=a,
            model_b=b,
            key_id=key,
            completion_a=ids[0],
            completion_b=ids[1],
            messages=[{"role": "user", "content": prompt}],
        )
    )
    assert row.winner is None and row.source == "human"
    return row.id


async def test_a_decisive_vote_is_a_dpo_pair_and_a_battle_takes_one_vote(store: Store) -> None:
    battle_id = await battle(store, "base", "tuned")
    # Another key's battle reads as missing, to read and to vote on.
    with pytest.raises(NotFound):
        await store.get_battle(battle_id, owner=BOB)
    with pytest.raises(NotFound):
        await store.vote_battle(battle_id, "a", key_id=BOB, owner=BOB)
    opened = await store.get_battle(battle_id, owner=ALICE)
    assert opened.answer_b == ("answer 0 to P", "stop")

    row, preference = await store.vote_battle(
        battle_id, "b", key_id=ALICE, annotator="ann", owner=ALICE
    )
    assert row.winner == "b" and row.voted_at is not None
    assert preference is not None and row.feedback_id == preference.id
    assert (preference.completion_id, preference.preferred_over) == ("c-tuned-P", "c-base-P")
    assert preference.model == "tuned" and preference.annotator == "ann"
    with pytest.raises(Conflict):
        await store.vote_battle(battle_id, "a", key_id=ALICE, owner=ALICE)
    with pytest.raises(Conflict):  # the admin cannot vote twice either
        await store.vote_battle(battle_id, "tie", key_id="admin", owner=None)

    rows, records = store.export_rows()
    items, _ = build_export("dpo", rows, records)
    assert items == [
        {"prompt": "<user>P<assistant>", "chosen": "answer 0 to P", "rejected": "answer 0 to P"}
    ]
    assert (await store.get_battle(battle_id)).winner == "b"


async def test_ties_and_both_bad_stay_battle_outcomes(store: Store) -> None:
    tie = await battle(store, "base", "tuned", prompt="Q1")
    bad = await battle(store, "base", "tuned", prompt="Q2")
    for battle_id, winner in ((tie, "tie"), (bad, "both_bad")):
        row, preference = await store.vote_battle(battle_id, winner, key_id=ALICE, owner=ALICE)
        assert preference is None and row.feedback_id is None and row.preference_note is None
    assert store.export_rows()[0] == []  # no feedback rows: nothing to export
    outcomes, sources = await store.battle_outcomes()
    assert outcomes == [("base", "tuned", "tie"), ("base", "tuned", "both_bad")]
    assert sources == ["human"]
    with pytest.raises(InvalidRequest):
        await store.vote_battle(bad, "c", key_id=ALICE)


async def test_answers_of_different_templates_are_not_paired(store: Store) -> None:
    """The store pairs only answers to the same prompt text: a DPO pair's prompt is one
    text. Models whose templates differ still battle; the vote rates them and stores no pair."""
    battle_id = await battle(store, "base", "other-template")
    row, preference = await store.vote_battle(battle_id, "a", key_id=ALICE, owner=ALICE)
    assert preference is None and row.winner == "a"
    assert row.preference_note == DIFFERENT_PROMPTS
    assert store.export_rows()[0] == []
    assert (await store.battle_outcomes())[0] == [("base", "other-template", "a")]


async def judged(store: Store, judge: str, a: str, b: str, winner: str, times: int = 1) -> None:
    for _ in range(times):
        await store.record_battle(
            BattleCreate(model_a=a, model_b=b, key_id=ALICE, source=judge, winner=winner)
        )


async def test_leaderboard_filters_by_source_and_pins_the_anchor(store: Store) -> None:
    empty = await leaderboard(store, owner=None, source=None, anchor=None)
    assert empty.data == [] and empty.battles == 0 and empty.win_rates == {}

    # Humans: x beats y 3-1 with a tie. A judge: y beats x 4-0 with a tie.
    for i, winner in enumerate(("a", "a", "a", "b", "tie")):
        battle_id = await battle(store, "x", "y", prompt=f"h{i}")
        await store.vote_battle(battle_id, winner, key_id=ALICE, owner=ALICE)
    await judged(store, judge_source("smol"), "x", "y", "b", times=4)
    await judged(store, judge_source("smol"), "y", "x", "tie")

    humans = await leaderboard(store, owner=ALICE, source="human", anchor="y")
    assert humans.sources == ["human", "judge:smol"]
    assert humans.anchor == "y" and humans.battles == 5 and humans.resamples >= 1000
    x, y = humans.data
    assert (x.model, y.model) == ("x", "y") and y.rating == 1000.0
    # 3.5 of 5 points: p = 0.7, so 400·log10(0.7/0.3) above the anchor.
    assert x.rating == pytest.approx(1000 + 400 * 0.36797678529, abs=0.01)
    assert x.low is not None and x.high is not None and x.low < x.rating < x.high
    assert (x.wins, x.losses, x.ties, x.battles) == (3, 1, 1, 5)
    assert humans.win_rates["x"]["y"] == pytest.approx(0.7)
    assert humans.win_rates["y"]["x"] == pytest.approx(0.3)
    assert humans.win_rates["x"]["x"] is None

    judge = await leaderboard(store, owner=None, source="judge:smol", anchor=None)
    assert [r.model for r in judge.data] == ["y", "x"] and judge.battles == 5
    assert judge.data[0].rank == 1
    # Sources are never mixed unless asked: no source is people's votes; "all" mixes.
    default = await leaderboard(store, owner=None, source=None, anchor=None)
    assert default.source == "human" and default.battles == 5
    both = await leaderboard(store, owner=None, source="all", anchor=None)
    assert both.source == "all"
    assert both.battles == 10 and both.anchor == "x"  # default anchor: the first by name
    assert (await leaderboard(store, owner=BOB, source=None, anchor=None)).data == []

    with pytest.raises(InvalidRequest) as refused:
        await leaderboard(store, owner=None, source="human", anchor="nobody")
    assert refused.value.param == "anchor"
    await judged(store, judge_source("smol"), "p", "q", "a")  # a pair that never met x or y
    with pytest.raises(NotRateable, match="never met"):
        await leaderboard(store, owner=None, source="judge:smol", anchor=None)
