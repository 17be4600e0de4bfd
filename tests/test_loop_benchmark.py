"""`python -m loadtest loop`: the online loop's benchmark. Its rule (examples/loop_objective.py)
checked by hand, and `--quick` run end to end as a smoke test of the plumbing (one method,
one iteration: it shows nothing about improvement, and asserts none)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.loop import bootstrap_rate, load_objective, split_prompts
from tests.conftest import run_cli
from tests.data import EVAL_SET, real_file

objective = load_objective()


def test_the_objective_rule_by_hand() -> None:
    fine = (
        "The sea covers most of the planet. " * 1 + "It holds salt water, many fish and "
        "the currents that move heat around the world, which shapes the weather we feel."
    )
    assert objective.meets(fine) and objective.score([], fine) == 10.0
    assert objective.judgment([], fine) is None
    assert not objective.meets("")  # empty
    assert not objective.meets("Yes.")  # too short
    assert not objective.meets("word " * 70 + "end.")  # too long
    assert not objective.meets(fine.rstrip("."))  # cut off mid-sentence
    looping = "The sea is big. The sea is big. The sea is big. The sea is big. The sea is big."
    assert objective.judgment([], looping) == "Repetitive: a sentence is repeated."
    assert objective.pairwise([], fine, "Yes.") == "a" and objective.pairwise([], "No", "") == "tie"
    # The null control's random judge agrees with itself across the two orders.
    swap = {"a": "b", "b": "a", "tie": "tie"}
    for i in range(50):
        first, second = f"answer {i}", f"other {i}"
        verdict = objective.random_pairwise([], first, second)
        assert verdict == swap[objective.random_pairwise([], second, first)]


def test_prompts_split_into_disjoint_held_out_and_training_slices(tmp_path: Path) -> None:
    eval_set = tmp_path / "eval.json"
    eval_set.write_text(json.dumps([{"instruction": f"Task {i}."} for i in range(50)]))
    heldout, train = split_prompts(eval_set, 10, seed=0)
    assert len(heldout) == 10 and len(train) == 40 and not set(heldout) & set(train)
    assert split_prompts(eval_set, 10, seed=0) == (heldout, train)
    rate = bootstrap_rate([True] * 3 + [False] * 7)
    assert rate["rate"] == 0.3 and rate["low"] < 0.3 < rate["high"] and rate["n"] == 10


@pytest.mark.slow
def test_quick_loop_runs_serve_judge_train_gate_and_measure(
    test_env: dict[str, str], tmp_path: Path
) -> None:
    eval_set = real_file(EVAL_SET)
    out = tmp_path / "loop"
    args = ["loop", "--quick", "--eval-set", str(eval_set), "--out", str(out)]
    result = run_cli(args, test_env, timeout=900, module="loadtest")
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    print("loop --quick:", json.dumps(summary["methods"]["kto"], default=str)[:3000])
    assert summary["complete"] is True
    run = summary["methods"]["kto"]
    assert run["base"]["n"] == 12 and 0 <= run["base"]["rate"] <= 1
    (iteration,) = run["iterations"]
    assert iteration["status"] == "succeeded", iteration
    assert iteration["examples"] >= 8 and iteration["train"]["steps"] >= 1
    gate = iteration["gate"]
    assert gate["judge"] == "gatekeeper" and gate["items"] == 12
    assert gate["eval_source"].endswith("heldout.json")
    # Measured on the gate's own greedy answers (both sides, every held-out prompt).
    assert iteration["objective"]["n"] == 12 and not gate["incumbent_cached"]
    for step in ("serve_s", "judge_s", "align_s"):
        assert iteration["timings"][step] >= 0
    assert (out / "objective.png").stat().st_size > 0
    assert "| kto |" in result.stdout
