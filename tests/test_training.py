"""The training module on real checkpoints: CUT data from the real CUT file through the
served renderer, LoRA training on a tiny Llama, merges, and (slow) evidence that CUT on the
default model lowers the tokens a judgment flags."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from server.models.adapter_meta import META_FILE, base_fingerprint
from server.models.render import Message, Renderer
from server.training.cut_data import (
    CutRecord,
    build_dataset,
    build_example,
    parse_records,
    read_records,
)
from server.training.merge import MergeError, merge_adapter
from server.training.trainer import (
    CutConfig,
    load_trainable,
    response_logprobs,
    train_cut_adapter,
)
from tests.data import CUT_TRAIN_FILE, cut_records, real_file, write_cut_records

# Wrong answers with judgments that name the error. Under the judgment prompt the 135M
# model's probability of the wrong token rises (p_A / p_B > 1.1), so CUT flags it. (For
# "Sydney" as the capital of Australia it does not: that token is not flagged at 1.1.)
EVIDENCE = [
    {
        "instruction": "What is the largest planet in the solar system?",
        "output": "The largest planet in the solar system is Saturn.",
        "judgment": "Wrong: Saturn is the second largest; Jupiter is the largest planet.",
        "wrong": " Saturn",
    },
    {
        "instruction": "Who wrote Romeo and Juliet?",
        "output": "Romeo and Juliet was written by Charles Dickens.",
        "judgment": "Wrong: Charles Dickens did not write it; William Shakespeare wrote "
        "Romeo and Juliet.",
        "wrong": " Charles",
    },
    {
        "instruction": "What is the chemical symbol for gold?",
        "output": "The chemical symbol for gold is Ag.",
        "judgment": "Wrong: Ag is silver; the symbol for gold is Au.",
        "wrong": " Ag",
    },
    {
        "instruction": "What is the capital of France?",
        "output": "The capital of France is Paris.",
        "judgment": None,
        "wrong": None,
    },
]
EVIDENCE_CONFIG = CutConfig(
    learning_rate=1e-3,
    warmup_steps=0,
    batch_size=1,
    epochs=4,
    downsample=-1,
    lora_dropout=0.0,
)


@pytest.fixture(scope="module")
def renderer(default_model_path: Path) -> Renderer:
    return Renderer.load(default_model_path)


def test_cut_repo_file_becomes_examples_through_the_served_renderer(renderer: Renderer) -> None:
    records, sha = read_records(real_file(CUT_TRAIN_FILE))
    assert len(records) == 1000 and sum(r.judged for r in records) == 287
    data = build_dataset(renderer, records, sha256=sha, downsample_ratio=0.25, cutoff=2048, seed=0)
    assert data.fine == int(287 * 0.25) and data.fine_dropped == 713 - 71
    assert data.judged + data.skipped == 287
    assert data.skipped <= 3  # responses that tokenize differently after the two prompts
    # the plain prompt is exactly what a chat request with this instruction renders to
    first = next(r for r in records if r.judged)
    example = build_example(renderer, first, 2048)
    assert example is not None and example.judge_ids is not None
    served = renderer.render_chat([Message("user", first.instruction)]).token_ids
    assert example.plain_ids[: len(served)] == served
    assert example.plain_ids[-example.response_len :] == example.judge_ids[-example.response_len :]
    assert example.plain_ids[-1] == renderer.tokenizer.eos_token_id
    judge = renderer.render_extra("judge", [Message("user", first.instruction)], judgment="x")
    assert "### Judgment:\nx" in judge.text and first.instruction in judge.text


def test_input_field_joins_the_instruction_and_long_sequences_lose_prompt_first(
    renderer: Renderer,
) -> None:
    (record,) = parse_records(
        [{"instruction": "Translate.", "input": "Bonjour", "output": "Hello.", "judgment": None}]
    )
    assert record.instruction == "Translate.\nBonjour" and not record.judged
    (scored,) = parse_records([{"instruction": "a", "output": "b", "judgment": "c", "score": 8}])
    assert scored.judgment is None  # score >= 7: judged fine
    full = build_example(renderer, CutRecord("Say hi.", "Hi there, friend.", "Too long."), 2048)
    cut = build_example(renderer, CutRecord("Say hi.", "Hi there, friend.", "Too long."), 8)
    assert full is not None and cut is not None
    assert len(cut.plain_ids) == 8 and cut.plain_ids == full.plain_ids[-8:]
    assert cut.response_len == full.response_len  # the response is kept whole


def test_quark_family_cannot_train_cut(tiny_dir: Path) -> None:
    from server.training.cut_data import CutDataError

    quark = Renderer.load(tiny_dir / "gptj")
    with pytest.raises(CutDataError, match="no judgment template"):
        build_dataset(quark, [], sha256="", downsample_ratio=0.25, cutoff=64, seed=0)


def test_training_changes_only_the_lora_and_writes_metadata(tiny_dir: Path, tmp_path: Path) -> None:
    data = write_cut_records(tmp_path / "cut.json", 12)
    out = tmp_path / "tiny-cut"
    config = CutConfig(warmup_steps=0, batch_size=2, learning_rate=1e-2, lora_dropout=0.0)
    before = load_trainable(tiny_dir / "llama", config)
    base_before = {k: v.clone() for k, v in before.named_parameters() if "lora" not in k}
    _, report, dataset = train_cut_adapter(
        base=tiny_dir / "llama", data=data, out=out, config=config, family="cut"
    )
    assert report.steps == math.ceil(len(dataset.examples) / 2) and report.tokens > 0
    assert (out / "adapter_model.safetensors").is_file() and not (
        out / "adapter_model.bin"
    ).exists()
    meta = json.loads((out / META_FILE).read_text())
    assert meta["method"] == "cut" and meta["family"] == "cut"
    assert meta["template"] == "alpaca.jinja"
    assert meta["base_model"]["fingerprint"] == base_fingerprint(tiny_dir / "llama")
    assert meta["hyperparameters"]["threshold"] == 1.1
    assert meta["data"]["judged"] == dataset.judged > 0
    # the LoRA moved, the base did not
    from peft import PeftModel

    trained = PeftModel.from_pretrained(
        load_trainable(tiny_dir / "llama", config).get_base_model(), str(out)
    )
    lora_b = [p for k, p in trained.named_parameters() if "lora_B" in k]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # initialised at zero
    for k, v in trained.get_base_model().named_parameters():
        key = k if k in base_before else f"base_model.model.{k}"
        if "lora" not in k and key in base_before:
            assert torch.equal(v, base_before[key])


def test_merge_equals_base_plus_adapter_and_is_idempotent(tiny_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = tmp_path / "cut.json"
    data.write_text(json.dumps(cut_records(6)))
    adapter = tmp_path / "adapter"
    config = CutConfig(warmup_steps=0, batch_size=2, learning_rate=5e-2, lora_dropout=0.0)
    train_cut_adapter(base=tiny_dir / "llama", data=data, out=adapter, config=config, family="cut")
    out = tmp_path / "merged"
    assert merge_adapter(tiny_dir / "llama", adapter, out, dtype="float32").merged
    assert not merge_adapter(tiny_dir / "llama", adapter, out, dtype="float32").merged

    ids = torch.tensor([[1, 400, 500, 600, 700, 800]])
    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir / "llama"), dtype=torch.float32)
    with torch.no_grad():
        expected = PeftModel.from_pretrained(base, str(adapter)).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
        got = merged.eval()(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(str(tiny_dir / "llama")).float()(ids).logits
    assert (expected - plain).abs().max() > 1e-3  # the adapter does something
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    assert json.loads((out / META_FILE).read_text())["method"] == "cut"

    with pytest.raises(MergeError, match="different base"):
        merge_adapter(tiny_dir / "gptj", adapter, tmp_path / "wrong")
    with pytest.raises(MergeError, match="already holds something else"):
        merge_adapter(tiny_dir / "llama", adapter, tiny_dir / "llama")
    pickled = tmp_path / "pickled"
    shutil.copytree(adapter, pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(MergeError, match=r"pickled adapter_model\.bin is refused"):
        merge_adapter(tiny_dir / "llama", pickled, tmp_path / "x")


def response_probs(model, renderer: Renderer, records: list[CutRecord]):  # type: ignore[no-untyped-def]
    """Per record: the response tokens' text, p under the plain prompt, and flagged marks."""
    out = []
    with torch.no_grad():
        for record in records:
            ex = build_example(renderer, record, 2048)
            assert ex is not None
            (plain,) = response_logprobs(model, [ex.plain_ids], ex.response_len)
            flagged = torch.zeros_like(plain, dtype=torch.bool)
            if ex.judge_ids is not None:
                judge, _ = response_logprobs(model, [ex.judge_ids, ex.plain_ids], ex.response_len)
                flagged = (judge - plain).exp() > EVIDENCE_CONFIG.threshold
            tokens = [renderer.tokenizer.decode([t]) for t in ex.plain_ids[-ex.response_len :]]
            out.append((tokens, plain.exp(), flagged))
    return out


@pytest.mark.slow
def test_cut_lowers_the_flagged_tokens_of_the_default_model(
    default_model_path: Path, renderer: Renderer, tmp_path: Path
) -> None:
    """Evidence that it learns, on the real default model (the numbers go to the log)."""
    data = tmp_path / "evidence.json"
    data.write_text(json.dumps([{**e, "input": ""} for e in EVIDENCE]))
    records, _ = read_records(data)
    model = load_trainable(default_model_path, EVIDENCE_CONFIG).eval()
    before = response_probs(model, renderer, records)
    out = tmp_path / "evidence-cut"
    train_cut_adapter(base=default_model_path, data=data, out=out, config=EVIDENCE_CONFIG)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(str(default_model_path), dtype=torch.float32)
    trained = PeftModel.from_pretrained(fresh, str(out)).eval()
    after = response_probs(trained, renderer, records)
    flagged_change, kept_change = [], []
    for item, (tokens, p0, flagged), (_, p1, _) in zip(EVIDENCE, before, after, strict=True):
        print(" ".join(f"{t!r}:{a:.3f}->{b:.3f}" for t, a, b in zip(tokens, p0, p1, strict=True)))
        change = torch.log(p1.clamp(min=1e-9)) - torch.log(p0.clamp(min=1e-9))
        if item["wrong"] is None:
            assert p1.mean() >= p0.mean()  # a fine response is learned by plain likelihood
            continue
        assert flagged[tokens.index(item["wrong"])], f"{item['wrong']!r} not flagged"
        likely = flagged & (p0 >= 0.1)  # flagged tokens the model was inclined to produce
        flagged_change += change[likely].tolist()
        kept_change += change[~flagged].tolist()
        # tokens never flagged keep (most of) their probability: no collapse
        assert p1[~flagged].mean() > 0.5 * p0[~flagged].mean()
    mean_flagged = sum(flagged_change) / len(flagged_change)
    mean_kept = sum(kept_change) / len(kept_change)
    print(f"mean change of log p: flagged {mean_flagged:+.2f}, unflagged {mean_kept:+.2f}")
    # Flagged tokens the model was inclined to produce (p >= 0.1) lose most of their
    # probability; the others gain. A flagged token already improbable can rise a little
    # (" Ag" 0.002 -> 0.03): its unlikelihood gradient is only p / (1 - p), while the
    # likelihood of the response under the judgment prompt, half the loss, is trained up
    # and a 135M model keeps the two prompts poorly apart.
    assert len(flagged_change) >= 3
    assert mean_flagged < -0.7 and mean_kept > 0


CONVERSATION = [
    {"role": "system", "content": "Answer in one short sentence."},
    {"role": "user", "content": "What is the capital of Italy?"},
    {"role": "assistant", "content": "The capital of Italy is Rome."},
    {"role": "user", "content": "And of France?"},
]


def _split_one_token(renderer: Renderer, ids: list[int]) -> list[int]:
    """``ids`` with one multi-character token replaced by two tokens of the same text: a
    sequence a sampler can produce, which re-tokenizing the text never gives back."""
    tok = renderer.tokenizer
    for i, piece in enumerate(tok.convert_ids_to_tokens(ids)):
        for cut in range(1, len(piece)):
            left, right = tok.convert_tokens_to_ids([piece[:cut], piece[cut:]])
            if tok.unk_token_id not in (left, right) and None not in (left, right):
                return [*ids[:i], left, right, *ids[i + 1 :]]
    raise AssertionError("no token of the text can be split")


def test_token_exact_examples_train_on_the_ids_that_were_served(renderer: Renderer) -> None:
    """With the served ids, the plain sequence is the served prompt's ids followed by the
    produced ids, token for token, even where the text re-tokenizes differently; the
    judgment prompt keeps the whole conversation (system message, earlier turns)."""
    tok = renderer.tokenizer
    messages = [Message(m["role"], m["content"]) for m in CONVERSATION]
    served_prompt = renderer.render_chat(messages).token_ids
    text = "The capital of France is Paris."
    produced = [*_split_one_token(renderer, tok(text, add_special_tokens=False)["input_ids"])]
    produced.append(tok.eos_token_id)
    assert tok.decode(produced, skip_special_tokens=True) == text
    assert tok(text, add_special_tokens=False)["input_ids"] != produced[:-1]

    (record,) = parse_records(
        [
            {
                "instruction": "And of France?",
                "input": "",
                "output": text,
                "judgment": "Correct, but say why.",
                "messages": CONVERSATION,
                "prompt_token_ids": served_prompt,
                "output_token_ids": produced,
            }
        ]
    )
    example = build_example(renderer, record, 4096)
    assert example is not None and example.judge_ids is not None
    assert example.plain_ids == served_prompt + produced
    assert example.response_len == len(produced)
    assert example.judge_ids[-len(produced) :] == produced
    judge_text = tok.decode(example.judge_ids[: -len(produced)])
    for kept in ("Answer in one short sentence.", "capital of Italy", "Rome.", "And of France?"):
        assert kept in judge_text
    assert "Correct, but say why." in judge_text

    # Re-tokenizing the text (what a text-only record gets) gives other ids.
    text_only = CutRecord("And of France?", text, "Correct, but say why.", messages=tuple(messages))
    retokenized = build_example(renderer, text_only, 4096)
    assert retokenized is not None and retokenized.plain_ids[: len(served_prompt)] == served_prompt
    assert retokenized.plain_ids[len(served_prompt) :] != produced


def test_token_ids_in_a_training_file_are_checked() -> None:
    from server.training.cut_data import CutDataError

    base = {"instruction": "a", "output": "b", "judgment": None}
    with pytest.raises(CutDataError, match="come together"):
        parse_records([{**base, "prompt_token_ids": [1, 2]}])
    with pytest.raises(CutDataError, match="list of token ids"):
        parse_records([{**base, "prompt_token_ids": [1, "x"], "output_token_ids": [3]}])
    with pytest.raises(CutDataError, match="role"):
        parse_records([{**base, "messages": [{"role": "tool", "content": "x"}]}])


def test_judgment_prompts_keep_the_conversation_as_served(tiny_dir: Path) -> None:
    """CUT's judgment prompt over a whole conversation is the served prompt with the
    judgment put before the last response: a system message that replaced the Alpaca
    preamble stays, and so do earlier turns (CUT and KTO families)."""
    messages = [Message(m["role"], m["content"]) for m in CONVERSATION]
    judgment = "Name the city first."
    cut = Renderer.load(tiny_dir / "llama", family_name="cut")
    plain = cut.render_chat(messages).text
    judged = cut.render_extra("judge", messages, judgment=judgment).text
    assert plain.startswith("Answer in one short sentence.\n\n### Instruction:\n")
    assert plain.endswith("\n\n### Response:\n")
    assert judged == plain.removesuffix("\n\n### Response:\n") + (
        f"\n\n### Judgment:\n{judgment}\n\n### Response:\n"
    )
    kto = Renderer.load(tiny_dir / "mistral", family_name="kto")
    plain = kto.render_chat(messages).text
    judged = kto.render_extra("judge", messages, judgment=judgment).text
    earlier = plain.removesuffix("<|user|>\nAnd of France?\n<|assistant|>\n")
    assert earlier.startswith("<|system|>\nAnswer in one short sentence.\n<|user|>\n")
    assert judged.startswith(earlier) and judged.endswith(
        f"### Instruction:\nAnd of France?\n\n### Judgment:\n{judgment}\n<|assistant|>\n"
    )
