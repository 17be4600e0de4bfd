"""Training-data formats from feedback rows, field by field (no database needed)."""

from __future__ import annotations

import dataclasses
import time

from server.feedback.export import (
    build_export,
    to_cut,
    to_dpo,
    to_kto,
    to_quark,
    to_trl_kto,
)
from server.store import ChoiceRecord, CompletionRecord, FeedbackRow

PROMPT_TEXT = "<|im_start|>user\nName the capital of Australia.<|im_end|>\n<|im_start|>assistant\n"


def record(cid: str, answers: list[str], *, endpoint: str = "chat") -> CompletionRecord:
    request = (
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name the capital of Australia."},
        ]
        if endpoint == "chat"
        else "Name the capital of Australia."
    )
    return CompletionRecord(
        id=cid,
        created_at=time.time(),
        endpoint=endpoint,
        model="m",
        family="chat",
        template_fingerprint="f",
        request=request,
        prompt_text=PROMPT_TEXT,
        sampling={},
        choices=[ChoiceRecord(i, a, "stop") for i, a in enumerate(answers)],
        prompt_tokens=10,
        completion_tokens=5,
        latency_ms=1.0,
    )


_ROW_NUMBER = iter(range(1, 1_000_000))


def fb(cid: str, index: int = 0, **fields: object) -> FeedbackRow:
    seq = next(_ROW_NUMBER)
    values: dict = dict(
        id=f"fb-{cid}-{index}-{seq}",
        seq=seq,
        created_at=time.time(),
        completion_id=cid,
        choice_index=index,
        model="m",
        judgment=None,
        rating=None,
        rating_scale=None,
        label=None,
        preferred_over=None,
        annotator=None,
        key_id="k",
        idempotency_key=None,
        payload_hash="h",
    )
    values.update(fields)
    return FeedbackRow(**values)


RECORDS = {
    "a": record("a", ["Sydney.", "Canberra."]),
    "b": record("b", ["Melbourne."]),
    "c": record("c", ["Canberra is the capital."], endpoint="completions"),
}


def test_cut_format_matches_the_cut_repo() -> None:
    rows = [
        fb("a", 0, judgment="Wrong: the capital of Australia is Canberra, not Sydney."),
        fb("a", 1, rating=1, rating_scale="thumbs"),  # judged fine, no words
        fb("b", 0, rating=-1, rating_scale="thumbs"),  # thumbs-down, no words: skipped
        fb("c", 0, label="desirable", judgment="Correct and concise."),
    ]
    cut_repo_fields = ("id", "instruction", "input", "output", "judgment")
    assert [{k: item[k] for k in cut_repo_fields} for item in to_cut(rows, RECORDS)] == [
        {
            "id": 0,
            "instruction": "Name the capital of Australia.",
            "input": "",
            "output": "Sydney.",
            "judgment": "Wrong: the capital of Australia is Canberra, not Sydney.",
        },
        {
            "id": 1,
            "instruction": "Name the capital of Australia.",
            "input": "",
            "output": "Canberra.",
            "judgment": None,
        },
        {
            "id": 2,
            "instruction": "Name the capital of Australia.",
            "input": "",
            "output": "Canberra is the capital.",
            "judgment": None,
        },
    ]


def test_kto_binary_feedback_records() -> None:
    rows = [
        fb("a", 0, label="undesirable"),
        fb("a", 1, rating=5, rating_scale="stars"),
        fb("b", 0, rating=3, rating_scale="stars"),
    ]  # neutral: skipped
    out = to_kto(rows, RECORDS)
    assert len(out) == 2
    first = out[0]
    assert set(first) == {"prompt_id", "prompt", "output", "label", "reward", "type", "split"}
    assert first["prompt"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name the capital of Australia."},
    ]
    assert first["output"] == [{"role": "assistant", "content": "Sydney."}]
    assert (first["label"], first["reward"], first["type"], first["split"]) == (
        0,
        0.0,
        "binary_feedback",
        "train",
    )
    assert (out[1]["label"], out[1]["reward"]) == (1, 1.0)
    assert out[0]["prompt_id"] == out[1]["prompt_id"]  # same prompt


def test_trl_kto_uses_the_rendered_prompt() -> None:
    out = to_trl_kto([fb("a", 1, label="desirable"), fb("a", 0, judgment="wrong")], RECORDS)
    assert out == [
        {"prompt": PROMPT_TEXT, "completion": "Canberra.", "label": True},
        {"prompt": PROMPT_TEXT, "completion": "Sydney.", "label": False},
    ]


def test_dpo_pairs_from_preferences_and_from_rated_choices() -> None:
    rows = [
        fb("b", 0, preferred_over="a"),
        fb("a", 0, rating=2, rating_scale="stars"),
        fb("a", 1, rating=5, rating_scale="stars"),
    ]
    assert to_dpo(rows, RECORDS) == [
        {"prompt": PROMPT_TEXT, "chosen": "Melbourne.", "rejected": "Sydney."},
        {"prompt": PROMPT_TEXT, "chosen": "Canberra.", "rejected": "Sydney."},
    ]


def test_quark_records() -> None:
    """ALT's data pool: one object per prompt, generations best first. Two rated answers are
    fewer than K = 5, so both get the worst token (the rule: ``tests/test_quantiles.py``)."""
    rows = [fb("a", 0, rating=1, rating_scale="stars"), fb("a", 1, rating=5, rating_scale="stars")]
    assert to_quark(rows, RECORDS) == [
        {
            "prompt": "Name the capital of Australia.",
            "generations": ["Canberra.", "Sydney."],
            "rewards": [1.0, 0.0],
            "quantile_tokens": ["_QUANTILE_TOKEN_4_", "_QUANTILE_TOKEN_4_"],
            "quantiles": [4, 4],
        }
    ]


def test_cut_records_carry_the_whole_conversation_and_the_served_ids() -> None:
    """The system message and earlier turns survive (not only the last user message), and
    the ids the engine received and produced travel with the record."""
    served = record("t", ["Canberra."])
    served.request = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "Name the capital of Australia."},
    ]
    served.prompt_token_ids = [1, 5, 6, 7]
    served.choices = [ChoiceRecord(0, "Canberra.", "stop", token_ids=[8, 9, 2])]
    (item,) = to_cut([fb("t", 0, judgment="Too short.")], {"t": served})
    assert item["instruction"] == "Name the capital of Australia."
    assert item["messages"] == served.request
    assert (item["prompt_token_ids"], item["output_token_ids"]) == ([1, 5, 6, 7], [8, 9, 2])
    assert (item["completion_id"], item["choice_index"], item["finish_reason"]) == ("t", 0, "stop")


def test_conflicting_verdicts_the_latest_wins_and_is_counted() -> None:
    """Stated rule: on one choice the latest committed verdict wins; the report counts the
    verdicts it replaced and the choices whose verdicts disagreed."""
    rows = [
        fb("a", 0, label="desirable"),
        fb("a", 0, judgment="Wrong: it is Canberra."),  # later, disagrees: wins
        fb("a", 1, label="desirable"),
        fb("a", 1, rating=1, rating_scale="thumbs"),  # later, agrees: no conflict
        fb("b", 0, preferred_over="a", preferred_over_choice=1),
        fb("a", 1, preferred_over="b"),  # the same pair, reversed later: wins
    ]
    items, report = build_export("cut", rows, RECORDS)
    assert [(i["output"], i["judgment"]) for i in items] == [
        ("Sydney.", "Wrong: it is Canberra."),
        ("Canberra.", None),
    ]
    assert (report.feedback_rows, report.superseded, report.conflicts) == (6, 3, 2)
    pairs, _ = build_export("dpo", rows, RECORDS)
    assert {"chosen": "Canberra.", "rejected": "Melbourne."}.items() <= pairs[0].items()
    assert len([p for p in pairs if p["rejected"] == "Canberra."]) == 0
    kto, _ = build_export("kto", rows, RECORDS)
    assert [(k["output"][0]["content"], k["label"]) for k in kto] == [
        ("Sydney.", 0),
        ("Canberra.", 1),
    ]


def test_a_pair_names_its_losing_choice_and_never_mixes_prompts() -> None:
    several = record("m", ["x0", "x1", "y0", "y1"], endpoint="completions")
    several.request = ["first", "second"]
    several.choices = [
        ChoiceRecord(0, "x0", "stop", prompt_text="first"),
        ChoiceRecord(1, "x1", "stop", prompt_text="first"),
        ChoiceRecord(2, "y0", "stop", prompt_text="second"),
        ChoiceRecord(3, "y1", "stop", prompt_text="second"),
    ]
    records = {**RECORDS, "m": several}
    rows = [
        fb("a", 1, preferred_over="a", preferred_over_choice=0),
        fb("m", 0, rating=5, rating_scale="stars"),
        fb("m", 1, rating=4, rating_scale="stars"),
        fb("m", 2, rating=1, rating_scale="stars"),  # the worst, but of another prompt
        fb("m", 3, rating=3, rating_scale="stars"),
    ]
    assert to_dpo(rows, records) == [
        {"prompt": PROMPT_TEXT, "chosen": "Canberra.", "rejected": "Sydney."},
        {"prompt": "first", "chosen": "x0", "rejected": "x1"},
        {"prompt": "second", "chosen": "y1", "rejected": "y0"},
    ]


def test_trl_prompts_carry_the_bos_the_served_model_received() -> None:
    """TRL ≥ 0.12 adds no BOS to a decoder-only prompt (older TRL adds one when missing):
    the prompt's text starts with BOS's text exactly when the engine got a BOS id."""
    with_bos = record("s", ["Canberra."])
    with_bos.prompt_bos = "<s>"
    records = {"s": with_bos, "a": RECORDS["a"]}
    (kto,) = to_trl_kto([fb("s", 0, label="desirable")], records)
    assert kto["prompt"] == "<s>" + PROMPT_TEXT
    (pair,) = to_dpo([fb("s", 0, preferred_over="a")], records)
    assert pair["prompt"] == "<s>" + PROMPT_TEXT
    (plain,) = to_trl_kto([fb("a", 0, label="desirable")], records)
    assert plain["prompt"] == PROMPT_TEXT


def test_a_reward_never_replaces_a_verdict_and_quark_reads_the_latest_reward() -> None:
    """A neutral rating or an explicit reward after a judgment leaves CUT its judgment; the
    Quark pool takes the latest reward on each choice."""
    rows = [
        fb("a", 0, judgment="Sydney is not the capital."),
        fb("a", 0, explicit_reward=0.2),
        fb("a", 1, rating=3, rating_scale="stars"),
    ]
    (cut,) = build_export("cut", rows, RECORDS)[0]
    assert cut["judgment"] == "Sydney is not the capital."
    (pool,) = build_export("quark", rows, RECORDS)[0]
    assert sorted(pool["rewards"]) == [0.2, 0.5]


def test_the_held_out_share_can_be_each_models_own() -> None:
    from server.store.holdout import held_out

    ids = [f"x{i}" for i in range(200)]
    inside = next(i for i in ids if held_out(i, 0.5))
    records = {inside: record(inside, ["Canberra."])}
    rows = [fb(inside, rating=1)]
    assert build_export("kto", rows, records, lambda model: 0.5)[1].held_out == 1
    assert build_export("kto", rows, records, lambda model: 0.0)[1].held_out == 0


def test_conversations_with_tools_are_not_exported() -> None:
    """The formats hold text turns: feedback on a conversation with a tool message or an
    answer's calls is left out, and counted."""
    asked = record("t1", ["Canberra."])
    asked.request = [
        *asked.request,
        {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "Canberra"},
    ]
    called = record("t2", ['<tool_call>{"name": "f"}</tool_call>'])
    message = {"content": None, "tool_calls": [{"id": "c"}]}
    called.choices = [dataclasses.replace(called.choices[0], message=message)]
    records = {**RECORDS, "t1": asked, "t2": called}
    assert asked.uses_tools and called.uses_tools and not RECORDS["a"].uses_tools
    rows = [fb("t1", label="good"), fb("t2", label="bad"), fb("a", 1, label="good")]
    items, report = build_export("kto", rows, records)
    assert (len(items), report.with_tools, report.held_out) == (1, 2, 0)
    pair = [fb("a", 1, preferred_over="t2", preferred_over_choice=0)]
    assert build_export("dpo", pair, records)[1].with_tools == 1
