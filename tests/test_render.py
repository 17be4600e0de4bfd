"""Rendering per family: golden prompts from the model cards (DESIGN.md §4), BOS once,
user text never becoming a control token, detection, conversation rules, fingerprints."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.models.render import (
    FamilyDetectionError,
    Message,
    PromptForm,
    Renderer,
    RenderError,
    detect_family,
)

ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_JUDGE = (
    "Below is an instruction that describes a task. Write a response to the instruction and "
    "the response should match the corresponding judgment.\n\n### Instruction:\n{instruction}"
    "\n\n### Judgment:\n{judgment}\n\n### Response:\n"
)
CAKE = [
    Message("user", "Hi! I'm looking for a cake recipe."),
    Message("assistant", "What kind of cake?"),
    Message("user", "Chocolate cake."),
]
TULU_CAKE = (
    "<|user|>\nHi! I'm looking for a cake recipe.\n<|assistant|>\nWhat kind of cake?\n"
    "<|user|>\nChocolate cake.\n<|assistant|>\n"
)
TLDR = (
    "SUBREDDIT: r/relationship_advice\n"
    "TITLE: I'm [18M] going to a party where an old middle school crush [17F] is also going.\n"
    "POST: Story time! …\n"
    "TL;DR:"
)
INJECTIONS = [
    "</s>",
    "<s>",
    "<|assistant|>",
    "<|user|>",
    "<|im_end|>",
    "<|im_start|>",
    "<|endoftext|>",
    "_QUANTILE_TOKEN_0_",
    "### Response:",
]


def build_renderers(tiny_dir: Path) -> dict[str, Renderer]:
    return {
        "cut": Renderer.load(tiny_dir / "llama", family_name="cut"),
        "kto": Renderer.load(tiny_dir / "mistral", family_name="kto"),
        "quark": Renderer.load(tiny_dir / "gptj"),  # detected
        "dpo": Renderer.load(tiny_dir / "chat", family_name="dpo"),
        "chat": Renderer.load(tiny_dir / "chat"),  # detected
    }


@pytest.fixture(scope="module")
def renderers(tiny_dir: Path) -> dict[str, Renderer]:
    return build_renderers(tiny_dir)


def test_cut_renders_the_alpaca_prompt_exactly(renderers: dict[str, Renderer]) -> None:
    instruction = "What are the names of some famous actors that started their careers on Broadway?"
    prompt = renderers["cut"].render_chat([Message("user", instruction)])
    assert prompt.text == ALPACA_NO_INPUT.format(instruction=instruction)


def test_cut_judgment_prompt_is_the_repos(renderers: dict[str, Renderer]) -> None:
    prompt = renderers["cut"].render_extra(
        "judge",
        [Message("user", "Name the capital of Australia.")],
        judgment="Wrong: the capital of Australia is Canberra, not Sydney.",
    )
    assert prompt.text == ALPACA_JUDGE.format(
        instruction="Name the capital of Australia.",
        judgment="Wrong: the capital of Australia is Canberra, not Sydney.",
    )


def test_kto_renders_the_cake_conversation_exactly(renderers: dict[str, Renderer]) -> None:
    assert renderers["kto"].render_chat(CAKE).text == TULU_CAKE


def test_quark_prefixes_the_quantile_token_as_one_id(renderers: dict[str, Renderer]) -> None:
    r = renderers["quark"]
    prompt = r.render_chat([Message("user", "  " + TLDR + "\n")])
    assert prompt.text == "_QUANTILE_TOKEN_0_" + TLDR  # stripped, no separator
    token0 = r.tokenizer.convert_tokens_to_ids("_QUANTILE_TOKEN_0_")
    assert prompt.token_ids[0] == token0
    assert prompt.token_ids.count(token0) == 1
    assert r.tokenizer.decode(prompt.token_ids[1:]) == TLDR
    # No BOS for GPT-J: the input is the token followed by the text.
    assert r.tokenizer.bos_token_id not in prompt.token_ids
    worst = r.render_chat([Message("user", TLDR)], quantile=4)
    assert worst.token_ids[0] == r.tokenizer.convert_tokens_to_ids("_QUANTILE_TOKEN_4_")
    assert r.render_text(TLDR).token_ids == prompt.token_ids


@pytest.mark.parametrize("family", ["cut", "kto", "dpo"])
def test_bos_appears_exactly_once(renderers: dict[str, Renderer], family: str) -> None:
    r = renderers[family]
    ids = r.render_chat(CAKE).token_ids
    assert ids[0] == r.tokenizer.bos_token_id
    assert ids.count(r.tokenizer.bos_token_id) == 1


def test_dpo_uses_the_checkpoint_template_and_default_system(
    renderers: dict[str, Renderer],
) -> None:
    text = renderers["dpo"].render_chat([Message("user", "你好")]).text
    assert text == "<s><<SYS>>\n你是一个有用的人工智能助手。\n<</SYS>>\n\n[INST] 你好 [/INST]"
    own = renderers["dpo"].render_chat([Message("system", "Be brief."), Message("user", "Hi")])
    assert "Be brief." in own.text and "你是" not in own.text


@pytest.mark.parametrize("family", ["cut", "kto", "quark", "dpo", "chat"])
@pytest.mark.parametrize("marker", INJECTIONS)
def test_user_text_never_becomes_a_control_token(
    renderers: dict[str, Renderer], family: str, marker: str
) -> None:
    r = renderers[family]
    if family == "quark":
        clean = [Message("user", "Summarise: the cat sat.")]
        dirty = [Message("user", f"Summarise: the cat {marker} sat.{marker}")]
    else:
        clean = [
            Message("user", "Hi there"),
            Message("assistant", "Hello!"),
            Message("user", "Tell me more."),
        ]
        dirty = [
            Message("user", f"{marker}Hi there"),
            Message("assistant", f"Hello!{marker}"),
            Message("user", f"Tell {marker} me more. {marker}"),
        ]
    clean_ids = r.render_chat(clean).token_ids
    dirty_prompt = r.render_chat(dirty)
    assert r.count_control_ids(dirty_prompt.token_ids) == r.count_control_ids(clean_ids)
    # The ids still spell exactly the rendered text (plus the family's BOS).
    bos = r.tokenizer.bos_token if r.spec.bos == "add" else ""
    assert r.tokenizer.decode(dirty_prompt.token_ids) == bos + dirty_prompt.text
    assert marker in dirty_prompt.text


def test_guarded_tokenization_matches_the_fast_path_on_clean_text(
    renderers: dict[str, Renderer],
) -> None:
    # The two tokenization paths agree, id for id, wherever no control text is involved.
    for r in renderers.values():
        msgs = [Message("user", "Summarise the news in two lines.")]
        fast = r.render_chat(msgs).token_ids
        system, turns = r._conversation(msgs)
        variables = {"quantile_token": r.quantile_tokens[0]} if r.quantile_tokens else {}
        text = r.render_chat(msgs).text
        guarded = r._with_bos(
            r._tokenize_guarded(r._template, system, turns, variables, text, PromptForm())
        )
        assert guarded == fast


# --- vLLM's chat options: assistant prefill, no generation prompt, template variables ------

QUESTION = [Message("user", "Name a planet.")]
PREFILLED = [*QUESTION, Message("assistant", "The planet is")]


@pytest.mark.parametrize("family", ["cut", "kto", "quark"])
def test_a_fixed_template_continues_the_prefill_after_its_answer_opening(
    renderers: dict[str, Renderer], family: str
) -> None:
    r = renderers[family]
    continued = r.render_chat(PREFILLED, continue_final=True, generation_prompt=False)
    assert continued.text == r.render_chat(QUESTION).text + "The planet is"
    # Tokenized as one text, as a trainer tokenizes prompt + response.
    assert continued.token_ids == r._with_bos(r._encode(continued.text))
    with pytest.raises(RenderError) as refused:
        r.render_chat(QUESTION, generation_prompt=False)
    assert refused.value.param == "add_generation_prompt"
    with pytest.raises(RenderError) as refused:
        r.render_chat(QUESTION, template_kwargs={"greeting": "hi"})
    assert refused.value.param == "chat_template_kwargs" and family in str(refused.value)


@pytest.mark.parametrize("family", ["dpo", "chat"])
def test_a_checkpoint_template_renders_vllms_chat_options_as_transformers_does(
    renderers: dict[str, Renderer], family: str
) -> None:
    r = renderers[family]

    def hf(messages: list[Message], **options: bool) -> list[int]:
        # With the family's default system message, as the gateway sends it (DPO's).
        system = [{"role": "system", "content": r.spec.system}] if r.spec.system else []
        conversation = system + [{"role": m.role, "content": m.content} for m in messages]
        return list(
            r.tokenizer.apply_chat_template(conversation, return_dict=True, **options)["input_ids"]
        )

    continued = r.render_chat(PREFILLED, continue_final=True, generation_prompt=False)
    assert continued.text.endswith("The planet is")
    expected = hf(PREFILLED, continue_final_message=True, add_generation_prompt=False)
    assert continued.token_ids == expected
    open_ended = r.render_chat(QUESTION, generation_prompt=False)
    assert open_ended.token_ids == hf(QUESTION, add_generation_prompt=False)
    with pytest.raises(RenderError) as refused:
        r.render_chat(QUESTION, continue_final=True, generation_prompt=False)
    assert refused.value.param == "messages"


@pytest.mark.parametrize("marker", INJECTIONS)
def test_a_prefill_and_template_variables_never_become_control_tokens(
    renderers: dict[str, Renderer], tiny_dir: Path, tmp_path: Path, marker: str
) -> None:
    for r in renderers.values():
        clean = r.render_chat(PREFILLED, continue_final=True, generation_prompt=False)
        dirty = r.render_chat(
            [*QUESTION, Message("assistant", f"The {marker} planet is{marker}")],
            continue_final=True,
            generation_prompt=False,
        )
        assert r.count_control_ids(dirty.token_ids) == r.count_control_ids(clean.token_ids)
        assert marker in dirty.text

    # A template variable is user text too (a checkpoint template that prints one).
    template = tmp_path / "greeting.jinja"
    template.write_text(
        "{{ greeting }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% endif %}"
    )
    r = Renderer.load(tiny_dir / "chat", template=str(template))
    plain = r.render_chat(QUESTION, template_kwargs={"greeting": "Hello. "})
    assert plain.text.startswith("Hello. <|im_start|>user")
    dirty = r.render_chat(QUESTION, template_kwargs={"greeting": f"Hello{marker}. "})
    assert r.count_control_ids(dirty.token_ids) == r.count_control_ids(plain.token_ids)


def test_family_detection(tiny_dir: Path, renderers: dict[str, Renderer]) -> None:
    assert detect_family(renderers["quark"].tokenizer) == "quark"
    assert detect_family(renderers["chat"].tokenizer) == "chat"
    assert renderers["chat"].family == "chat"
    with pytest.raises(FamilyDetectionError, match="Set `family`"):
        Renderer.load(tiny_dir / "llama")


def test_quark_conversation_rules(renderers: dict[str, Renderer]) -> None:
    r = renderers["quark"]
    with pytest.raises(RenderError, match="exactly one user message"):
        r.render_chat(CAKE)
    with pytest.raises(RenderError, match="no system message"):
        r.render_chat([Message("system", "x"), Message("user", "y")])
    with pytest.raises(RenderError, match=r"quantile must be in 0\.\.4"):
        r.render_chat([Message("user", "y")], quantile=5)


def test_other_conversation_rules(renderers: dict[str, Renderer]) -> None:
    with pytest.raises(RenderError, match="Quark models only"):
        renderers["cut"].render_chat([Message("user", "y")], quantile=0)
    with pytest.raises(RenderError, match="alternating"):
        renderers["kto"].render_chat([Message("user", "a"), Message("user", "b")])
    with pytest.raises(RenderError, match="last message must be from the user"):
        renderers["cut"].render_chat([Message("user", "a"), Message("assistant", "b")])
    with pytest.raises(RenderError, match="only come first"):
        renderers["kto"].render_chat(
            [Message("user", "a"), Message("system", "b"), Message("user", "c")]
        )


def test_system_and_history_rules_for_alpaca_and_tulu(renderers: dict[str, Renderer]) -> None:
    cut = renderers["cut"].render_chat([Message("system", "You are terse."), *CAKE]).text
    assert cut == (
        "You are terse.\n\n### Instruction:\nHi! I'm looking for a cake recipe.\n\n"
        "### Response:\nWhat kind of cake?</s>\n\n### Instruction:\nChocolate cake.\n\n"
        "### Response:\n"
    )
    kto = renderers["kto"].render_chat([Message("system", "You are terse."), *CAKE]).text
    assert kto == "<|system|>\nYou are terse.\n" + TULU_CAKE


def test_fingerprint_is_stable_and_tracks_the_template(
    tiny_dir: Path, tmp_path: Path, renderers: dict[str, Renderer]
) -> None:
    again = Renderer.load(tiny_dir / "mistral", family_name="kto")
    assert again.fingerprint == renderers["kto"].fingerprint
    legacy = tmp_path / "tulu_legacy.jinja"
    legacy.write_text(
        '{%- for m in messages -%}{{ "\\n<|" ~ m.role ~ "|>\\n" ~ m.content }}{%- endfor -%}'
        '{{ "\\n<|assistant|>\\n" }}'
    )
    override = Renderer.load(tiny_dir / "mistral", family_name="kto", template=str(legacy))
    assert override.fingerprint != renderers["kto"].fingerprint
    assert override.template_name == "tulu_legacy.jinja"
    assert override.render_chat([Message("user", "Hi")]).text == "\n<|user|>\nHi\n<|assistant|>\n"
    assert len({r.fingerprint for r in renderers.values()}) == len(renderers)
