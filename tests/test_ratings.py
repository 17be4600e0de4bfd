"""The arena's rating mathematics: the Bradley–Terry fit against a case solved by hand and
against battles drawn from known strengths, ties, the anchor, the win-rate matrix, and the
promotion gate's decision."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from server.evaluation.ratings import (
    Battle,
    RatingsError,
    combine_both_orders,
    leaderboard,
    win_rate,
)


def _battles(model_a: str, model_b: str, **winners: int) -> list[Battle]:
    return [Battle(model_a, model_b, w) for w, n in winners.items() for _ in range(n)]  # type: ignore[arg-type]


def _ratings(battles: list[Battle], **kwargs: object) -> dict[str, float]:
    board = leaderboard(battles, resamples=0, **kwargs)  # type: ignore[arg-type]
    return {row.model: row.rating for row in board.rows}


def test_three_models_match_the_hand_computed_mle() -> None:
    # A scores 3 of 4 against B (2 wins, 2 ties), B beats C 3-1 (one battle listed as C vs B),
    # A beats C 9-1. With p = 1/(1 + 10^(-(Ra-Rb)/400)), the ratings A = C + 800·log10(3),
    # B = C + 400·log10(3) give p(A,B) = p(B,C) = 3/4 and p(A,C) = 9/10, i.e. every model's
    # expected score equals its actual score, so they solve the likelihood equations exactly.
    battles = (
        _battles("A", "B", a=2, tie=2)
        + _battles("B", "C", a=3)
        + _battles("C", "B", a=1)
        + _battles("A", "C", a=9, b=1)
    )
    ratings = _ratings(battles, anchor="C")
    assert ratings["C"] == 1000.0
    assert ratings["B"] == pytest.approx(1000 + 400 * math.log10(3), abs=1e-3)
    assert ratings["A"] == pytest.approx(1000 + 800 * math.log10(3), abs=1e-3)


def test_a_balanced_cycle_rates_everyone_equal() -> None:
    battles = _battles("A", "B", a=3, b=1) + _battles("B", "C", a=3, b=1)
    battles += _battles("C", "A", a=3, b=1)
    assert _ratings(battles) == pytest.approx({"A": 1000.0, "B": 1000.0, "C": 1000.0}, abs=1e-3)


def test_a_tie_counts_half_to_each_side() -> None:
    # Two wins and two ties is a score of 3 out of 4, the same as three wins and a loss;
    # "both_bad" is a tie too (Chatbot Arena's "tie (bothbad)").
    cycle = _battles("B", "C", a=2, b=1) + _battles("C", "A", a=1, b=1)
    with_ties = _ratings(_battles("A", "B", a=2, tie=2) + cycle)
    with_both_bad = _ratings(_battles("A", "B", a=2, both_bad=2) + cycle)
    without = _ratings(_battles("A", "B", a=3, b=1) + cycle)
    assert with_ties == pytest.approx(without, abs=1e-3)
    assert with_both_bad == pytest.approx(without, abs=1e-3)
    only_ties = _ratings(_battles("A", "B", tie=5) + _battles("B", "C", tie=1))
    assert only_ties == pytest.approx({"A": 1000.0, "B": 1000.0, "C": 1000.0}, abs=1e-3)
    board = leaderboard(_battles("A", "B", a=2, tie=2) + cycle, resamples=0)
    row = next(r for r in board.rows if r.model == "A")
    assert (row.wins, row.losses, row.ties, row.battles) == (3, 1, 2, 6)
    assert board.win_rates["A"]["B"] == 0.75 and board.win_rates["B"]["A"] == 0.25


def test_the_anchor_is_exactly_1000_and_only_shifts_the_scale() -> None:
    battles = _battles("x", "y", a=7, b=3, tie=2) + _battles("y", "z", a=4, b=6)
    battles += _battles("z", "x", a=2, b=5)
    by_default = _ratings(battles)  # first model alphabetically
    by_z = _ratings(battles, anchor="z")
    assert by_default["x"] == 1000.0 and by_z["z"] == 1000.0
    shift = by_default["z"] - 1000.0
    assert {m: r - shift for m, r in by_default.items()} == pytest.approx(by_z, abs=1e-6)
    with pytest.raises(RatingsError, match="anchor"):
        leaderboard(battles, anchor="w")


def _simulate(truth: dict[str, float], n: int, rng: np.random.Generator) -> list[Battle]:
    """Battles from the model the fit assumes: each pair's expected score (ties half) is the
    Bradley–Terry probability; 10 % of battles are ties."""
    names = list(truth)
    strength = np.array([truth[m] for m in names])
    a = rng.integers(len(names), size=n)
    b = (a + rng.integers(1, len(names), size=n)) % len(names)  # any other model, uniformly
    p = 1.0 / (1.0 + 10 ** ((strength[b] - strength[a]) / 400))
    tie = 0.1
    u, v = rng.random(n), rng.random(n)
    winner = np.where(u < tie, "tie", np.where(v < (p - tie / 2) / (1 - tie), "a", "b"))
    return [
        Battle(names[x], names[y], w)  # type: ignore[arg-type]
        for x, y, w in zip(a, b, winner, strict=True)
    ]


def test_known_strengths_are_recovered_and_covered_by_the_intervals() -> None:
    truth = {"m0": 1000.0, "m1": 1080.0, "m2": 930.0, "m3": 1200.0, "m4": 1010.0}
    covered = total = 0
    for seed in range(8):
        rng = np.random.default_rng(seed)
        board = leaderboard(_simulate(truth, 1500, rng), anchor="m0", resamples=300, rng=seed)
        # m0 and m4 (10 points apart) may swap; the rest of the order must come out right.
        order = [row.model for row in board.rows]
        assert order[0] == "m3" and order[1] == "m1" and order[-1] == "m2"
        assert set(order[2:4]) == {"m0", "m4"}
        for row in board.rows:
            assert row.low is not None and row.high is not None
            assert row.low <= row.rating <= row.high
            if row.model != "m0":  # the anchor's interval is the point 1000 by construction
                total += 1
                covered += row.low <= truth[row.model] <= row.high
    assert covered / total >= 0.8, f"95 % intervals covered the truth in {covered} of {total}"


def test_ranks_come_with_their_bootstrap_intervals() -> None:
    """Chatbot Arena's "rank (CI)": a model far ahead ranks 1 in every resample; two close
    models share an interval covering both ranks."""
    truth = {"m0": 1000.0, "m1": 1080.0, "m2": 930.0, "m3": 1300.0, "m4": 1005.0}
    board = leaderboard(_simulate(truth, 1500, np.random.default_rng(0)), resamples=300, rng=0)
    ranks = {row.model: (row.rank_low, row.rank_high) for row in board.rows}
    assert ranks["m3"] == (1, 1) and ranks["m2"] == (5, 5)
    assert ranks["m0"] == ranks["m4"] == (3, 4)
    assert (
        leaderboard(_simulate(truth, 100, np.random.default_rng(1)), resamples=0).rows[0].rank_low
        is None
    )


def test_the_bootstrap_is_seeded_and_has_the_asked_resamples() -> None:
    battles = _simulate({"a": 1000.0, "b": 1100.0, "c": 1050.0}, 300, np.random.default_rng(3))
    default = leaderboard(battles, rng=7)
    assert default.resamples == 1000 and default.battles == 300 and default.confidence == 0.95
    first = leaderboard(battles, resamples=200, rng=7)
    assert first == leaderboard(battles, resamples=200, rng=7)
    narrow = leaderboard(battles, resamples=200, rng=7, confidence=0.5)
    for wide, half in zip(first.rows, narrow.rows, strict=True):
        if wide.model != "a":
            assert wide.low < half.low < half.high < wide.high  # type: ignore[operator]


def test_win_rate_matrix_and_json() -> None:
    battles = _battles("A", "B", a=1, b=3) + _battles("B", "C", a=3, tie=1)
    board = leaderboard(battles, resamples=50)
    assert board.win_rates["A"] == {"A": None, "B": 0.25, "C": None}
    assert board.win_rates["C"]["B"] == 0.125 and board.win_rates["B"]["C"] == 0.875
    data = json.loads(json.dumps(board.to_json()))
    assert data["anchor"] == "A" and data["battles"] == 8
    assert [row["model"] for row in data["rows"]] == ["B", "A", "C"]
    assert data["win_rates"]["B"]["B"] is None


def test_models_that_never_met_are_refused() -> None:
    battles = _battles("A", "B", a=2, b=1) + _battles("C", "D", a=1, b=1)
    with pytest.raises(RatingsError, match="never met"):
        leaderboard(battles)
    with pytest.raises(RatingsError, match="no battles"):
        leaderboard([])


def test_an_unbeaten_model_is_ranked_first_without_an_interval() -> None:
    # "U" never lost: its MLE is infinitely far above the others, so it gets no interval.
    battles = _battles("A", "B", a=3, b=2) + _battles("U", "A", a=3) + _battles("U", "B", a=2)
    board = leaderboard(battles, resamples=100)
    top = board.rows[0]
    assert top.model == "U" and not top.bounded and top.low is None and top.high is None
    assert math.isfinite(top.rating)
    assert all(row.bounded and row.low is not None for row in board.rows[1:])


def test_battle_rejects_unknown_winners_and_self_play() -> None:
    with pytest.raises(RatingsError):
        Battle("A", "B", "draw")  # type: ignore[arg-type]
    with pytest.raises(RatingsError):
        Battle("A", "A", "a")


def test_win_rate_counts_ties_half_with_a_wilson_interval() -> None:
    rate = win_rate(["win"] * 60 + ["loss"] * 40)
    assert rate.win_rate == 0.6
    assert (rate.low, rate.high) == pytest.approx((0.5020, 0.6906), abs=1e-4)
    tied = win_rate(["win"] * 2 + ["tie"] * 2)
    assert tied.win_rate == 0.75 and (tied.wins, tied.losses, tied.ties, tied.n) == (2, 0, 2, 4)


def test_both_orders_combine_agreeing_verdicts_and_tie_the_rest() -> None:
    assert combine_both_orders("win", "win") == "win"
    assert combine_both_orders("loss", "loss") == "loss"
    assert combine_both_orders("win", "loss") == "tie"
    assert combine_both_orders("win", "tie") == "tie"
