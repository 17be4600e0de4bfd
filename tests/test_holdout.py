"""The held-out share of traffic (``online.holdout``, ALIGNGATE_HOLDOUT, default 0.1):
chosen by a hash of the completion id, never exported or trained on, and the promotion
gate's default instructions."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from server.evaluation.gate_rule import GateRule
from server.feedback.export import build_export
from server.models.registry import Registry
from server.protocol import GateRequest
from server.settings import Settings
from server.store import ChoiceRecord, CompletionRecord, Store
from server.store.holdout import held_out, holdout_fraction
from server.training.service import gate_instructions
from tests.test_export import fb, record


def _ids(share: float, n: int, inside: bool) -> list[str]:
    found, i = [], 0
    while len(found) < n:
        cid = f"chatcmpl-holdout-{i}"
        if held_out(cid, share) == inside:
            found.append(cid)
        i += 1
    return found


def test_the_share_is_a_fixed_hash_of_the_id() -> None:
    ids = [f"chatcmpl-{i}" for i in range(20_000)]
    share = sum(held_out(i, 0.1) for i in ids) / len(ids)
    assert 0.09 < share < 0.11
    assert all(held_out(i, 0.1) == (holdout_fraction(i) < 0.1) for i in ids[:100])
    assert not any(held_out(i, 0.0) for i in ids)  # 0: nothing held out
    assert Settings.model_fields["holdout"].default == 0.1  # the gateways' default


def test_held_out_completions_never_leave_in_an_export() -> None:
    (kept,) = _ids(0.1, 1, inside=False)
    (held,) = _ids(0.1, 1, inside=True)
    records = {c: record(c, ["Canberra.", "Sydney."]) for c in (kept, held)}
    rows = [fb(kept, rating=1), fb(held, rating=1), fb(kept, preferred_over=held)]
    items, report = build_export("kto", rows, records, 0.1)
    assert len(items) == 1 and report.held_out == 2 and report.feedback_rows == 3
    items, report = build_export("kto", rows, records)  # no share: everything
    assert len(items) == 2 and report.held_out == 0


def _chat(cid: str, model: str, question: str) -> CompletionRecord:
    return CompletionRecord(
        id=cid,
        created_at=0.0,
        endpoint="chat",
        model=model,
        family="chat",
        template_fingerprint="f",
        request=[{"role": "user", "content": question}],
        prompt_text=question,
        sampling={},
        choices=[ChoiceRecord(0, "An answer.", "stop")],
        prompt_tokens=5,
        completion_tokens=2,
        latency_ms=1.0,
    )


async def test_the_gate_judges_held_out_traffic_first(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'store.db'}")
    registry = Registry(adapters_root=tmp_path)
    rule = GateRule()
    try:
        held = _ids(0.1, 6, inside=True)
        for i, cid in enumerate([*held, *_ids(0.1, 20, inside=False)]):
            await asyncio.wrap_future(store.record_completion(_chat(cid, "m", f"Question {i}?")))
        found = await store.held_out_completions(models=["m"], share=0.1, limit=100)
        assert sorted(r.id for r in found) == sorted(held)

        request = GateRequest(size=5)
        chosen = await gate_instructions(request, "m", registry, store, None, None, rule, 0.1)
        assert chosen.eval_source == "held-out traffic" and chosen.items is not None
        assert len(chosen.items) == 5 and not chosen.warnings
        assert {i.instruction for i in chosen.items} <= {f"Question {i}?" for i in range(6)}

        # Too few held-out prompts: the user's file, saying why.
        eval_file = tmp_path / "eval.json"
        eval_file.write_text(json.dumps([{"instruction": "Say hi."}]))
        request = GateRequest(size=50)
        chosen = await gate_instructions(request, "m", registry, store, None, eval_file, rule, 0.1)
        assert chosen.eval_file == eval_file and "only 6 held-out prompts" in chosen.warnings[0]
        # Nothing else: AlpacaEval, with the warning that it is the reported benchmark.
        chosen = await gate_instructions(request, "m", registry, store, None, None, rule, 0.1)
        assert chosen.eval_source == "alpaca_eval" and chosen.items is None
        assert "overlaps the benchmark you report" in chosen.warnings[-1]
        # The request's file wins over everything.
        chosen = await gate_instructions(request, "m", registry, store, eval_file, None, rule, 0.1)
        assert chosen.eval_file == eval_file and not chosen.warnings
    finally:
        store.close()
