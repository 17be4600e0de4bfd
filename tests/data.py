"""Data for the tests: the real files (AlpacaEval's instructions and reference outputs, the
CUT repo's judged training file) where ``ALIGNGATE_TEST_DATA`` points (default
``../shared/data`` beside the repo), and small inputs built here for the tests that only
need *some* instructions or judgments.

A test that needs a real file calls ``real_file``: where the file is absent the test skips
with a reason naming it, and with ``ALIGNGATE_REQUIRE_TEST_DATA=1`` (what ``.ci/run``
sets) it fails instead, so CI always runs them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TEST_DATA = Path(os.environ.get("ALIGNGATE_TEST_DATA") or REPO.parent / "shared" / "data")

# The real files, relative to TEST_DATA, and where each comes from publicly.
EVAL_SET = "alpaca_eval/eval_set.json"  # alpaca_eval's evaluation set (805 instructions)
CUT_13B_OUTPUTS = "alpaca_eval/reference/cut-13b.json"  # alpaca_eval's results/cut-13b
CUT_TRAIN_FILE = "cut/train-alpaca-sample-iter1.json"  # the CUT repo's data/iter/


def real_file(relative: str) -> Path:
    """The real data file, or a skip (a failure under ALIGNGATE_REQUIRE_TEST_DATA=1)."""
    path = TEST_DATA / relative
    if path.is_file():
        return path
    reason = (
        f"needs {relative} under ALIGNGATE_TEST_DATA ({TEST_DATA}: not found); "
        "README 'Tests' says where it comes from"
    )
    if os.environ.get("ALIGNGATE_REQUIRE_TEST_DATA") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


_DATASETS = ("helpful_base", "koala", "oasst", "selfinstruct", "vicuna")
_TOPICS = ("the sea", "a library", "winter", "bicycles", "coffee", "the moon", "bees", "rain")


def instructions(n: int) -> list[dict[str, str]]:
    """``n`` AlpacaEval-style items (instruction + dataset), varied enough that answers
    differ in length."""
    verbs = ("Write a short poem about", "Explain in two sentences what makes",
             "List three facts about", "Describe")  # fmt: skip
    return [
        {
            "instruction": f"{verbs[i % len(verbs)]} {_TOPICS[i % len(_TOPICS)]}. ({i})",
            "dataset": _DATASETS[i % len(_DATASETS)],
        }
        for i in range(n)
    ]


def write_eval_set(path: Path, n: int) -> Path:
    path.write_text(json.dumps(instructions(n)))
    return path


def write_reference(path: Path, items: list[dict[str, str]]) -> Path:
    """An AlpacaEval ``model_outputs`` file for ``items``, outputs of growing length."""
    outputs = [
        {**item, "output": " ".join(["word"] * (8 + 5 * i)), "generator": "reference"}
        for i, item in enumerate(items)
    ]
    path.write_text(json.dumps(outputs))
    return path


def cut_records(n: int) -> list[dict[str, object]]:
    """CUT-format records (id, instruction, input, output, judgment): every other one judged
    (an error the judgment names), the rest judged fine (judgment null)."""
    records: list[dict[str, object]] = []
    for i in range(n):
        a, b = i + 2, i + 3
        if i % 2 == 0:
            output, judgment = f"{a} + {b} = {a + b + 1}.", f"Wrong sum: {a} + {b} is {a + b}."
        else:
            output, judgment = f"{a} + {b} = {a + b}.", None
        records.append(
            {
                "id": i,
                "instruction": f"What is {a} + {b}? Answer with the sum.",
                "input": "" if i % 3 else f"Numbers: {a}, {b}",
                "output": output,
                "judgment": judgment,
            }
        )
    return records


def write_cut_records(path: Path, n: int) -> Path:
    path.write_text(json.dumps(cut_records(n)))
    return path


_SUBJECTS = ("the sea", "a library", "winter", "bicycles", "coffee", "the moon", "bees",
             "rain", "tea", "maps", "clocks", "gardens", "trains", "salt", "owls", "glass",
             "paper", "wind", "snow", "bread", "music", "rivers", "stones", "candles")  # fmt: skip


def short_vs_long_pairs(start: int, n: int) -> list[dict[str, object]]:
    """Preference pairs whose rule code can check: the short answer is preferred over the
    same answer padded with filler. Subjects ``start`` … ``start + n - 1`` (disjoint slices
    make a held-out set). Prompts are conversations, rendered by the family's template."""
    pairs: list[dict[str, object]] = []
    for subject in _SUBJECTS[start : start + n]:
        short = f"{subject.capitalize()} is worth knowing about."
        padded = (
            f"{short} There is a great deal more to say about {subject}, and many people "
            f"have written long essays on {subject} over the years, covering its history, "
            "its uses and its meaning in everyday life."
        )
        prompt = [{"role": "user", "content": f"Tell me about {subject}."}]
        pairs.append({"prompt": prompt, "chosen": short, "rejected": padded})
    return pairs


def unpaired(pairs: list[dict[str, object]]) -> list[dict[str, object]]:
    """The pairs as KTO's unpaired examples, interleaved: chosen desirable, rejected not."""
    out: list[dict[str, object]] = []
    for pair in pairs:
        out.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        out.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    return out
