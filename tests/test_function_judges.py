"""Function judges (``kind: function``): code that gives a score, a judgment or a pairwise
verdict, stored like any judge's under its own key."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from server.evaluation.judge_prompts import JudgeReplyError
from server.evaluation.judge_runs import judge_stored
from server.evaluation.judges import build_judge, compare, judge_one
from server.models.models_file import JudgeEntry, ModelsFileError, load_deployment
from server.store import ChoiceRecord, CompletionRecord, Store

CONVERSATION = [{"role": "user", "content": "What is the capital of Australia?"}]


def _function(name: str, target: str, verdict: str | None = None) -> JudgeEntry:
    return JudgeEntry(name=name, kind="function", target=target, verdict=verdict)  # type: ignore[arg-type]


async def test_a_function_gives_each_kind_of_verdict() -> None:
    scorer = build_judge(_function("words", "tests.function_judges:words"))
    assert scorer.kind == "score"
    short = await judge_one(scorer, CONVERSATION, "Canberra.")
    assert short.score == 10.0 and short.label == "desirable" and short.requests == 1
    assert short.judge_model == "tests.function_judges:words" and short.prompt_version == "function"
    long = await judge_one(scorer, CONVERSATION, "It is Sydney, the biggest city.")
    assert long.score == 1.0 and long.label == "undesirable"

    critic = build_judge(_function("cap", "tests.function_judges:capital", "judgment"))
    wrong = await judge_one(critic, CONVERSATION, "Sydney.")
    assert (
        wrong.judgment == "The capital of Australia is Canberra." and wrong.label == "undesirable"
    )
    assert (await judge_one(critic, CONVERSATION, "Canberra.")).label == "desirable"

    pairwise = build_judge(_function("short", "tests.function_judges:shorter", "pairwise"))
    verdict = await compare(pairwise, CONVERSATION, "Canberra.", "It is Canberra, of course.")
    assert (verdict.outcome, verdict.first, verdict.second) == ("a", "a", "a")
    # A position judge flips with the order: a tie, and the flip is visible.
    position = build_judge(_function("first", "tests.function_judges:first", "pairwise"))
    flipped = await compare(position, CONVERSATION, "Canberra.", "Sydney.")
    assert (flipped.outcome, flipped.first, flipped.second) == ("tie", "a", "b")


async def test_a_bad_result_is_an_unreadable_verdict_and_a_bad_target_a_start_error() -> None:
    broken = build_judge(_function("broken", "tests.function_judges:broken"))
    with pytest.raises(JudgeReplyError, match=r"returned 42\.0; expected a score from 1 to 10"):
        await judge_one(broken, CONVERSATION, "x")
    with pytest.raises(ModelsFileError, match=r"cannot import tests\.function_judges:absent"):
        build_judge(_function("absent", "tests.function_judges:absent"))
    with pytest.raises(ValueError, match="a function judge needs `target`"):
        JudgeEntry(name="x", kind="function")
    with pytest.raises(ValueError, match="a function judge has no url or model"):
        JudgeEntry(name="x", kind="function", target="a:b", url="self", model="m")
    with pytest.raises(ValueError, match="`target` and `verdict` are for kind: function"):
        JudgeEntry(name="x", kind="score", url="self", model="m", target="a:b")


def test_a_models_file_finds_functions_beside_it(tmp_path: Path) -> None:
    (tmp_path / "my_rules.py").write_text(
        "def polite(conversation, response):\n    return 10 if 'please' in response else 1\n"
    )
    models = tmp_path / "models.yaml"
    models.write_text(
        "models: [{name: m, path: builtin:smollm2-135m-instruct}]\n"
        "judges: [{name: polite, kind: function, target: 'my_rules:polite'}]\n"
    )
    (entry,) = load_deployment(models).judges
    judge = build_judge(entry)
    verdict = asyncio.run(judge_one(judge, CONVERSATION, "Canberra, please."))
    assert verdict.score == 10.0


async def test_function_verdicts_are_stored_under_the_judges_key(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        record = CompletionRecord(
            id="chatcmpl-function-judge",
            created_at=0.0,
            endpoint="chat",
            model="smollm2",
            family="chat",
            template_fingerprint="x",
            request=CONVERSATION,
            prompt_text="What is the capital of Australia?",
            sampling={},
            choices=[ChoiceRecord(0, "Canberra.", "stop")],
            prompt_tokens=7,
            completion_tokens=2,
            latency_ms=10,
        )
        await asyncio.wrap_future(store.record_completion(record))
        judge = build_judge(_function("words", "tests.function_judges:words"))
        summary = await judge_stored(store, judge)
        assert summary.judged == 1
        _, feedback = await store.get_completion(record.id)
        (fb,) = feedback
        assert (fb.annotator, fb.key_id, fb.label) == ("judge:words", "judge-words", "desirable")
        assert fb.reward() == 1.0  # score 10 on the [0, 1] scale
    finally:
        store.close()
