"""The length-controlled win rate (alpaca_eval's GLM) the gate reports beside the raw one."""

from __future__ import annotations

import numpy as np

from server.evaluation.length_control import length_controlled


def test_a_judge_that_follows_length_is_corrected() -> None:
    """The candidate's answers are longer and no better; the judge prefers length. The raw
    win rate looks like a win; at equal lengths it is not one."""
    rng = np.random.default_rng(0)
    n = 400
    candidate = rng.integers(50, 250, n)
    incumbent = rng.integers(50, 150, n)
    diff = candidate - incumbent
    prefer = 1 / (1 + np.exp(-2 * np.tanh(diff / diff.std())))
    scores = (rng.random(n) < prefer).astype(float)
    lc = length_controlled(list(scores), list(candidate), list(incumbent))
    assert scores.mean() > 0.55  # the raw rate
    assert abs(lc.win_rate - 0.5) < 0.06 and lc.lower_bound < 0.5
    assert lc.length_coefficient > 1


def test_equal_lengths_leave_the_win_rate_as_it_is() -> None:
    rng = np.random.default_rng(1)
    scores = list((rng.random(200) < 0.7).astype(float))
    lengths = [100] * 200
    lc = length_controlled(scores, lengths, lengths)
    assert abs(lc.win_rate - float(np.mean(scores))) < 1e-3
    assert 0.6 < lc.lower_bound < lc.win_rate and lc.length_coefficient == 0.0
    assert length_controlled([], [], []).win_rate == 0.5
