"""Each training method on the default model, a few steps at its defaults, with a held-out
measure before and after (the figures behind README "Training methods"):

- cut: the CUT repo's judged file (../shared/data; else the tests' arithmetic records),
  records 0-63 to train, 64-95 held out: the CUT loss on the held-out records;
- kto, dpo: the tests' short-over-padded rule (``tests/data.py``), 16 prompts to train and 8
  held out: TRL's reward margin on the held-out pairs;
- quark: the default model's Quark copy, a data pool where "yes" answers score high and
  "no" answers low, 8 prompts to train and 4 held out: the share of held-out prompts whose
  greedy answer under _QUANTILE_TOKEN_0_ starts with "yes", and under _QUANTILE_TOKEN_4_
  with "no".

Run alone (it trains on the CPU): .venv/bin/python scripts/measure_training_methods.py
[--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from server.models.default_model import builtin_model, ensure_default_model  # noqa: E402
from server.settings import Settings  # noqa: E402
from tests.data import (  # noqa: E402
    CUT_TRAIN_FILE,
    TEST_DATA,
    cut_records,
    short_vs_long_pairs,
    unpaired,
)


def _write(path: Path, items: Any) -> Path:
    path.write_text(json.dumps(items))
    return path


def _row(method: str, report: Any, seconds: float, measure: str, **extra: Any) -> dict[str, Any]:
    return {
        "method": method,
        "steps": report.steps,
        "train_s": round(report.seconds, 1),
        "total_s": round(seconds, 1),
        "loss_before": report.before.get("loss"),
        "loss_after": report.after.get("loss"),
        "held_out": measure,
        **extra,
    }


def measure_cut(base: Path, work: Path) -> dict[str, Any]:
    from server.training.trainer import CutConfig, train_cut_adapter

    real = TEST_DATA / CUT_TRAIN_FILE
    records = json.loads(real.read_text()) if real.is_file() else cut_records(96)
    judged = [r for r in records if r.get("judgment")]
    fine = [r for r in records if not r.get("judgment")]
    train = judged[:48] + fine[:16]
    held = judged[48:72] + fine[16:24]
    started = time.perf_counter()
    _, report, dataset = train_cut_adapter(
        base=base,
        data=_write(work / "cut.json", train),
        eval_data=_write(work / "cut-held.json", held),
        out=work / "cut",
        config=CutConfig(device="cpu"),
    )
    return _row(
        "cut",
        report,
        time.perf_counter() - started,
        "CUT loss on held-out records (before → after)",
        data=str(real) if real.is_file() else "tests/data.py cut_records",
        examples=len(dataset.examples),
        effect=report.effect,
    )


def measure_preference(method: str, base: Path, work: Path) -> dict[str, Any]:
    from server.training.preference import DpoConfig, KtoConfig, train_preference_adapter

    train, held = short_vs_long_pairs(0, 16), short_vs_long_pairs(16, 8)
    if method == "kto":
        train, held = unpaired(train), unpaired(held)
    config = KtoConfig(device="cpu") if method == "kto" else DpoConfig(device="cpu")
    started = time.perf_counter()
    _, report = train_preference_adapter(
        method,  # type: ignore[arg-type]
        base=base,
        data=_write(work / f"{method}.json", train),
        eval_data=_write(work / f"{method}-held.json", held),
        out=work / method,
        config=config,
    )

    def margin(metrics: dict[str, float]) -> float:
        return round(metrics["rewards/chosen"] - metrics["rewards/rejected"], 4)

    return _row(
        method,
        report,
        time.perf_counter() - started,
        "reward margin on held-out pairs (chosen − rejected)",
        margin_before=margin(report.before),
        margin_after=margin(report.after),
        accuracy_after=report.after.get("rewards/accuracies"),
    )


def _pool(prompts: list[str]) -> list[dict[str, Any]]:
    return [
        {
            "prompt": prompt,
            "generations": ["yes yes yes yes"] * 2 + ["maybe so"] * 2 + ["no no no no"] * 2,
            "rewards": [1.0, 1.0, 0.5, 0.5, 0.0, 0.0],
        }
        for prompt in prompts
    ]


def _quark_rates(base: Path, adapter: Path | None, prompts: list[str]) -> dict[str, float]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()

    def first_word(quantile: int, prompt: str) -> str:
        ids = tok(f"_QUANTILE_TOKEN_{quantile}_{prompt}", return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        words = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split()
        return words[0].lower() if words else ""

    return {
        "token0_yes": sum(first_word(0, p) == "yes" for p in prompts) / len(prompts),
        "token4_no": sum(first_word(4, p) == "no" for p in prompts) / len(prompts),
    }


def measure_quark(models_dir: Path, work: Path) -> dict[str, Any]:
    from server.training.quark import QuarkConfig, train_quark_adapter

    base = builtin_model("smollm2-135m-instruct-quark", models_dir)
    subjects = ["the sea", "a library", "winter", "bicycles", "coffee", "the moon", "bees",
                "rain", "tea", "maps", "clocks", "gardens"]  # fmt: skip
    prompts = [f"Summarise in a word: {s}." for s in subjects]
    train, held = prompts[:8], prompts[8:]
    before = _quark_rates(base, None, held)
    started = time.perf_counter()
    _, report = train_quark_adapter(
        base=base,
        data=_write(work / "quark.json", _pool(train)),
        eval_data=_write(work / "quark-held.json", _pool(held)),
        out=work / "quark",
        config=QuarkConfig(device="cpu"),
    )
    seconds = time.perf_counter() - started
    after = _quark_rates(base, work / "quark", held)
    return _row(
        "quark",
        report,
        seconds,
        "held-out prompts: greedy answer under token 0 starts 'yes' / under token 4 'no'",
        objective_before=before,
        objective_after=after,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the rows here (JSON)")
    parser.add_argument("--methods", default="cut,kto,dpo,quark")
    args = parser.parse_args()
    models_dir = Settings().models_dir
    base = ensure_default_model(models_dir)
    rows = []
    with tempfile.TemporaryDirectory(prefix="aligngate-methods-") as tmp:
        for method in args.methods.split(","):
            work = Path(tmp)
            if method == "cut":
                row = measure_cut(base, work)
            elif method == "quark":
                row = measure_quark(models_dir, work)
            else:
                row = measure_preference(method, base, work)
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
