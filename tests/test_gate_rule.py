"""The promotion gate's rule (``server/evaluation/gate_rule.py``): superiority by an exact
sign test, non-inferiority on request, the default size from a power calculation, and the
gate refusing to decide on unreadable or position-bound verdicts; the simulation
(``python -m loadtest gate-power``) checks the gateway's own rule through its CLI."""

from __future__ import annotations

import json

import pytest

from server.evaluation.gate import DEFAULT_SIZE
from server.evaluation.gate_rule import (
    GateRule,
    decide,
    lower_bound,
    promotion_probability,
    required_items,
    sign_test_p,
)
from server.protocol import GateRequest
from tests.conftest import run_cli


def test_superiority_promotes_a_clear_win_and_nothing_less() -> None:
    clear = decide(70, 25, 5)
    assert clear.promoted and clear.decided and clear.win_rate == 0.725
    assert clear.lower_bound > 0.5 and clear.p_value < 1e-5 and "0.725" in clear.reason
    even = decide(40, 40, 20)
    assert not even.promoted and even.win_rate == 0.5 and even.p_value > 0.5
    # 12-8 is a 0.6 win rate, not evidence of one; three lucky wins neither.
    assert not decide(12, 8, 0).promoted and not decide(3, 0, 0).promoted
    # The same rate over enough items is.
    assert decide(120, 80, 0).promoted
    assert not decide(0, 0, 0).promoted and decide(0, 0, 0).reason == "no judged comparisons"


def test_the_bound_is_the_sign_test_and_ties_count_half() -> None:
    for wins, losses, ties in [(30, 18, 10), (31, 18, 10), (60, 40, 16), (9, 1, 40)]:
        low = lower_bound(wins, losses, ties)
        assert (low > 0.5) == (sign_test_p(wins, losses) < 0.05)
    # Only ties: the win rate is exactly 0.5, and nothing is promoted.
    assert lower_bound(0, 0, 10) == 0.5 and not decide(0, 0, 10).promoted
    assert lower_bound(10, 0, 0) == pytest.approx(0.05 ** (1 / 10))  # Clopper-Pearson


def test_non_inferiority_promotes_a_not_worse_candidate_on_request() -> None:
    rule = GateRule(mode="non-inferiority", margin=0.05)
    close = decide(60, 50, 6, rule)  # 0.545: not shown better, shown not much worse
    assert close.promoted and close.threshold == 0.45 and "non-inferiority" in close.reason
    assert not decide(60, 50, 6).promoted  # superiority does not
    assert not decide(30, 70, 16, rule).promoted


def test_unreadable_or_position_bound_verdicts_stop_the_gate() -> None:
    unreadable = decide(90, 10, 0, unreadable=12)  # 12 of 112 > 10 %
    assert not unreadable.promoted and not unreadable.decided
    assert "12 of 112 pairs were unreadable" in unreadable.reason
    assert decide(90, 10, 0, unreadable=11).promoted  # 11 of 111 is under 10 %
    flipping = decide(60, 10, 46, flips=59)  # 59 of 116 flipped with the order
    assert not flipping.promoted and not flipping.decided and "unreliable" in flipping.reason


def test_the_default_size_has_the_power_and_the_false_promotion_it_promises() -> None:
    assert required_items() == DEFAULT_SIZE == GateRequest().size
    assert promotion_probability(DEFAULT_SIZE, 0.45, 0.25) >= 0.80
    assert promotion_probability(DEFAULT_SIZE - 1, 0.45, 0.25) < 0.80
    for ties in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6):
        half = (1 - ties) / 2
        assert promotion_probability(DEFAULT_SIZE, half, half) <= 0.05


def test_gate_power_simulation_checks_the_gateways_rule(test_env: dict[str, str]) -> None:
    """`python -m loadtest gate-power --json`: 10,000 runs per point through the CLI."""
    result = run_cli(["gate-power", "--json"], test_env, timeout=300, module="loadtest")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    print("gate-power:", json.dumps(report))
    assert report["runs"] == 10_000 and report["size"] == DEFAULT_SIZE and report["ok"]
    assert set(report["false_promotion"]) == {"0.0", "0.1", "0.2", "0.3", "0.4", "0.5", "0.6"}
    assert report["max_false_promotion"] <= 0.05 and report["power"] >= 0.80


def test_gate_decide_refuses_bad_lines(test_env: dict[str, str]) -> None:
    import subprocess
    import sys

    from tests.conftest import REPO

    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "gate", "decide"],
        input='{"wins": 1}\n',
        capture_output=True,
        text=True,
        env=test_env,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 2 and "line 1: expected {wins, losses, ties}" in result.stderr
