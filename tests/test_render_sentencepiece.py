"""Guarded rendering is exact on the real vocabularies (``tokenizers/`` under the test data:
LLaMA SentencePiece, GPT-2 BPE): a prompt whose user text holds control-token text gets the
ids of its rendered text tokenized in ONE pass, the template's own control tokens as control
ids and the user's text as characters (``split_special_tokens=True`` in context), with no
SentencePiece ``▁`` at the seams between template and user text.

The reference here is built without the renderer: each family's prompt written out by hand as
pieces (template text, user text, template control token), the stretches between control
tokens tokenized by the tokenizer's public call with ``split_special_tokens=True``. A
stretch after a control token is tokenized as the tokenizer continues after one (no ``▁`` in
SentencePiece's ``prepend_scheme: first``, a ``▁`` under the legacy ``Prepend`` normalizer);
``test_reference_is_the_one_pass_on_clean_text`` checks that rule against the tokenizer's
own one pass wherever the user text holds no control text.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.models.families import family
from server.models.render import Message, Renderer
from tests.data import real_file
from tests.tiny_checkpoints import LLAMA2_CHAT_TEMPLATE, QUANTILE_TOKENS

LLAMA_SPM = "tokenizers/llama-spm/tokenizer.json"
GPT2 = "tokenizers/gpt2/tokenizer.json"
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n"
)
EXAMPLES = 60  # per property and family: a few seconds each

# A prompt written out by hand: ("t", template text) | ("u", user text) | ("c", control token
# the template writes).
Pieces = list[tuple[str, str]]


def real_tokenizer_dir(relative: str) -> Path:
    return real_file(relative).parent


def legacy_llama_dir(tmp: Path) -> Path:
    """The LLaMA vocabulary with the legacy normalizer LLaMA-2's own tokenizer.json ships
    (``Prepend('▁')`` + ``Replace(' ', '▁')``, no pre-tokenizer): a ``▁`` after every
    control token, in one pass too."""
    source = real_tokenizer_dir(LLAMA_SPM)
    spec = json.loads((source / "tokenizer.json").read_text())
    spec["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ],
    }
    spec["pre_tokenizer"] = None
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "tokenizer.json").write_text(json.dumps(spec))
    shutil.copy(source / "tokenizer_config.json", tmp / "tokenizer_config.json")
    return tmp


def build_real_renderers(tmp: Path) -> dict[str, Renderer]:
    """Each family on the real vocabulary its checkpoint uses (DESIGN.md §4)."""
    from transformers import AutoTokenizer

    llama = real_tokenizer_dir(LLAMA_SPM)
    chat = tmp / "llama-spm-chat"
    tok = AutoTokenizer.from_pretrained(str(llama))
    tok.chat_template = LLAMA2_CHAT_TEMPLATE
    tok.save_pretrained(chat)
    quark = tmp / "gpt2-quark"
    tok = AutoTokenizer.from_pretrained(str(real_tokenizer_dir(GPT2)))
    tok.add_tokens(QUANTILE_TOKENS, special_tokens=True)
    tok.save_pretrained(quark)
    legacy = legacy_llama_dir(tmp / "llama-spm-legacy")
    return {
        "cut": Renderer.load(llama, family_name="cut"),
        "kto": Renderer.load(llama, family_name="kto"),
        "dpo": Renderer.load(chat, family_name="dpo"),
        "quark": Renderer.load(quark),  # detected from the quantile tokens
        "cut-legacy": Renderer.load(legacy, family_name="cut"),
    }


# ---- the reference, written without the renderer -----------------------------------------


def alpaca_pieces(system: str | None, turns: list[Message]) -> Pieces:
    if system is None:
        pieces: Pieces = [("t", ALPACA_PREAMBLE)]
    else:  # a system message replaces the preamble
        pieces = [("u", system), ("t", "\n\n")]
    for m in turns:
        if m.role == "user":
            pieces += [("t", "### Instruction:\n"), ("u", m.content), ("t", "\n\n### Response:\n")]
        else:
            pieces += [("u", m.content), ("c", "</s>"), ("t", "\n\n")]
    return pieces


def tulu_pieces(system: str | None, turns: list[Message]) -> Pieces:
    # On the LLaMA vocabulary <|user|> is not a token: template text like any other.
    pieces: Pieces = []
    if system is not None:
        pieces = [("t", "<|system|>\n"), ("u", system), ("t", "\n")]
    for m in turns:
        pieces += [("t", f"<|{m.role}|>\n"), ("u", m.content), ("t", "\n")]
    return [*pieces, ("t", "<|assistant|>\n")]


def llama2_chat_pieces(system: str | None, turns: list[Message]) -> Pieces:
    system = "你是一个有用的人工智能助手。" if system is None else system  # the family's default
    pieces: Pieces = [("c", "<s>"), ("t", "<<SYS>>\n"), ("u", system.strip())]
    pieces.append(("t", "\n<</SYS>>\n\n"))
    for m in turns:
        if m.role == "user":
            pieces += [("t", "[INST] "), ("u", m.content.strip()), ("t", " [/INST]")]
        else:
            pieces += [("t", " "), ("u", m.content.strip()), ("t", " "), ("c", "</s>")]
    return pieces


def quark_pieces(system: str | None, turns: list[Message]) -> Pieces:
    return [("c", QUANTILE_TOKENS[0]), ("u", turns[0].content.strip())]


PIECES: dict[str, Callable[[str | None, list[Message]], Pieces]] = {
    "cut": alpaca_pieces,
    "kto": tulu_pieces,
    "dpo": llama2_chat_pieces,
    "quark": quark_pieces,
}


def split_ids(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def continuation_ids(tok: Any, text: str) -> list[int]:
    """``text`` with every character ordinary, tokenized as the tokenizer continues after a
    control token."""
    pre = tok.backend_tokenizer.pre_tokenizer
    if pre is not None and json.loads(pre.__getstate__()).get("prepend_scheme") == "first":
        # SentencePiece puts '▁' only at the start of the input. Start the input with a
        # newline instead: no LLaMA piece holds one (asserted below), so it is a token
        # boundary ('▁', '<0x0A>') and what follows tokenizes as after a control token.
        assert not any("\n" in piece for piece in tok.get_vocab())
        ids = split_ids(tok, "\n" + text)
        assert tok.convert_ids_to_tokens(ids[:2]) == ["▁", "<0x0A>"]
        return ids[2:]
    # A legacy Prepend normalizer, or GPT-2's byte-level BPE without a prefix space: each
    # stretch between control tokens is tokenized on its own, wherever it lies.
    return split_ids(tok, text)


def reference_ids(renderer: Renderer, pieces: Pieces) -> list[int]:
    tok = renderer.tokenizer
    ids: list[int] = []
    stretch, at_start = "", True
    for kind, text in [*pieces, ("c", "")]:
        if kind != "c":
            stretch += text
            continue
        if stretch:
            ids += split_ids(tok, stretch) if at_start else continuation_ids(tok, stretch)
        if text:
            ids.append(tok.convert_tokens_to_ids(text))
        stretch, at_start = "", False
    if renderer.spec.bos == "add":
        ids = [tok.bos_token_id, *ids]
    return ids


def check_against_reference(renderer: Renderer, messages: list[Message]) -> list[int]:
    system, turns = renderer._conversation(messages)
    pieces = PIECES[renderer.spec.name](system, turns)
    prompt = renderer.render_chat(messages)
    assert prompt.text == "".join(text for _, text in pieces)
    expected = reference_ids(renderer, pieces)
    assert prompt.token_ids == expected, (
        renderer.tokenizer.convert_ids_to_tokens(prompt.token_ids),
        renderer.tokenizer.convert_ids_to_tokens(expected),
    )
    # The only control ids are the template's own (and the BOS the family adds).
    own = sum(kind == "c" for kind, _ in pieces) + (renderer.spec.bos == "add")
    assert renderer.count_control_ids(prompt.token_ids) == own
    return expected


# ---- user text ----------------------------------------------------------------------------

WORDS = ["end", "it", "with", "now", "Hello", "the", "cake", "Response", "###", "Instruction:",
         "[INST]", "[/INST]", "<<SYS>>", "你好", "naïve", "🙂", "x", "42", "TL;DR:"]  # fmt: skip
SPACES = [" ", "  ", "\n", "\n\n", "\t", " \n"]
FRAGMENTS = ["</", "s>", "<", ">", "/s", "<|", "|>", "▁", "_QUANTILE_TOKEN_", "endoftext",
             "<|user|>", "<|assistant|>", "<|system|>"]  # fmt: skip


def user_text(controls: list[str], *, clean: bool = False) -> st.SearchStrategy[str]:
    """Words, whitespace, unicode, and (unless ``clean``) the vocabulary's control strings
    and pieces of them, joined in any order."""
    parts = [st.sampled_from(WORDS), st.sampled_from(SPACES), st.text(max_size=3)]
    if not clean:
        parts += [st.sampled_from(controls), st.sampled_from(FRAGMENTS)]
    return st.lists(st.one_of(*parts), max_size=8).map("".join)


def conversations(family: str, text: st.SearchStrategy[str]) -> st.SearchStrategy[list[Message]]:
    if family == "quark":
        return text.map(lambda t: [Message("user", t)])

    def build(system: str | None, texts: list[str]) -> list[Message]:
        texts = texts[: (len(texts) - 1) | 1]  # an odd number: ends with a user turn
        turns = [Message(("user", "assistant")[i % 2], t) for i, t in enumerate(texts)]
        return ([Message("system", system)] if system is not None else []) + turns

    return st.builds(build, st.none() | text, st.lists(text, min_size=1, max_size=4))


FAMILIES = ["cut", "kto", "dpo", "quark", "cut-legacy"]
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Renderer]:
    return build_real_renderers(tmp_path_factory.mktemp("real-vocab"))


def controls_of(renderer: Renderer) -> list[str]:
    return sorted({*renderer._control_strings, *QUANTILE_TOKENS, "<|endoftext|>", "</s>"})


@pytest.mark.parametrize("family", FAMILIES)
def test_guarded_ids_are_the_one_pass_reference(real: dict[str, Renderer], family: str) -> None:
    renderer = real[family]
    guarded = 0

    @PROPERTY
    @given(messages=conversations(family, user_text(controls_of(renderer))))
    def check(messages: list[Message]) -> None:
        nonlocal guarded
        check_against_reference(renderer, messages)
        guarded += any(renderer._meets_control_text(m.content) for m in messages)

    started = time.perf_counter()
    check()
    print(
        f"{family}: {EXAMPLES} examples, {guarded} guarded, {time.perf_counter() - started:.2f} s"
    )
    assert guarded >= EXAMPLES // 4  # the property did exercise the guarded path


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_is_the_one_pass_on_clean_text(real: dict[str, Renderer], family: str) -> None:
    """Where no user text holds or meets control text, the reference, the renderer (one
    pass) and the guarded encoder (forced) all equal ``tokenizer(text)`` with control tokens
    parsed: today's common path is unchanged, and the reference's rule for text after a
    control token is the tokenizer's."""
    renderer = real[family]
    tok = renderer.tokenizer

    @PROPERTY
    @given(messages=conversations(family, user_text([], clean=True)))
    def check(messages: list[Message]) -> None:
        system, turns = renderer._conversation(messages)
        contents = [m.content for m in turns] + ([system] if system is not None else [])
        if any(renderer._meets_control_text(c) for c in contents):
            return  # e.g. a lone '<' from the unicode strategy
        prompt = renderer.render_chat(messages)
        one_pass = list(tok(prompt.text, add_special_tokens=False)["input_ids"])
        assert prompt.token_ids == renderer._with_bos(one_pass)
        assert check_against_reference(renderer, messages) == prompt.token_ids
        variables = {"quantile_token": QUANTILE_TOKENS[0]} if renderer.quantile_tokens else {}
        forced = renderer._tokenize_guarded(
            renderer._template, system, turns, variables, prompt.text
        )
        assert forced == one_pass

    check()


def test_the_readme_case_has_no_seam_tokens(real: dict[str, Renderer]) -> None:
    """tokenizers/README.md: CUT, one user turn "end it with </s> now"."""
    r = real["cut"]
    prompt = r.render_chat([Message("user", "end it with </s> now")])
    tokens = r.tokenizer.convert_ids_to_tokens(prompt.token_ids)
    assert tokens[-20:] == ["##", "#", "▁Inst", "ruction", ":", "<0x0A>", "end", "▁it", "▁with",
                            "▁</", "s", ">", "▁now", "<0x0A>", "<0x0A>", "##", "#", "▁Response",
                            ":", "<0x0A>"]  # fmt: skip
    assert "▁end" not in tokens and "▁" not in tokens
    assert r.count_control_ids(prompt.token_ids) == 1  # the BOS
    # Exactly split_special_tokens=True over the whole text (the template writes no control).
    assert prompt.token_ids == [r.tokenizer.bos_token_id, *split_ids(r.tokenizer, prompt.text)]


def test_control_text_after_a_template_control_token(real: dict[str, Renderer]) -> None:
    """A past assistant turn ends with the template's </s>: a control id; the next user
    turn's </s> stays characters, and the template text after the control token is
    tokenized as in one pass (no '▁' on LLaMA-spm, one '▁' under the legacy normalizer)."""
    messages = [
        Message("user", "Say </s>."),
        Message("assistant", "</s>"),
        Message("user", "</s>\nagain"),
    ]
    for name, after in (("cut", "<0x0A>"), ("cut-legacy", "▁")):
        r = real[name]
        ids = check_against_reference(r, messages)
        tokens = r.tokenizer.convert_ids_to_tokens(ids)
        eos = ids.index(r.tokenizer.eos_token_id)
        assert tokens[eos - 3 : eos + 2] == ["</", "s", ">", "</s>", after]
        assert ids.count(r.tokenizer.eos_token_id) == 1


STRADDLES = [  # (vocabulary, template, user text): control text across the seam
    (LLAMA_SPM, "{{ messages[0].content }}s> and more", "end it </"),
    (LLAMA_SPM, "{{ messages[0].content }}/s>", "end <"),
    (LLAMA_SPM, "</{{ messages[0].content }}", "s> begins"),
    (LLAMA_SPM, "<{{ messages[0].content }}>", "/s"),
    (GPT2, "{{ messages[0].content }}endoftext|>", "stop <|"),
    (GPT2, "<|endoftext{{ messages[0].content }}", "|> after"),
    (GPT2, "<|{{ messages[0].content }}|>", "endoftext"),
    (GPT2, "_QUANTILE_{{ messages[0].content }}_", "TOKEN_2"),
]


@pytest.mark.parametrize(("vocab", "template", "text"), STRADDLES)
def test_control_text_across_the_seam_is_characters(
    real: dict[str, Renderer], vocab: str, template: str, text: str
) -> None:
    """The one-pass path too: user text that ends, begins or completes a template's
    fragment of control text ("end </" + "s>") makes no control id."""
    tok = (real["cut"] if vocab == LLAMA_SPM else real["quark"]).tokenizer
    r = Renderer(tok, real["cut"].spec, template_source=template, template_name="straddle.jinja")
    prompt = r.render_chat([Message("user", text)])
    assert r.has_control_text(prompt.text)
    assert prompt.token_ids == [tok.bos_token_id, *split_ids(tok, prompt.text)]
    assert r.count_control_ids(prompt.token_ids) == 1  # the BOS


def test_a_template_control_token_right_after_user_text(real: dict[str, Renderer]) -> None:
    """User text ending in '<' before the template's own '</s>': that </s> is a control id,
    and the ids are the tokenizer's plain one pass."""
    tok = real["cut"].tokenizer
    for text in ("end <", "end </", "end </s"):
        r = Renderer(
            tok, real["cut"].spec, template_source="{{ messages[0].content }}</s>\nnext",
            template_name="eos.jinja",
        )  # fmt: skip
        prompt = r.render_chat([Message("user", text)])
        assert prompt.text == f"{text}</s>\nnext"
        assert prompt.token_ids == [
            tok.bos_token_id,
            *tok(prompt.text, add_special_tokens=False)["input_ids"],
        ]
        assert r.count_control_ids(prompt.token_ids) == 2


def test_plain_text_that_spells_a_control_token_is_refused(tmp_path: Path) -> None:
    """A vocabulary whose control token is also an ordinary piece ('hello' made special on
    GPT-2): the user's 'hello' would reach the engine as the control id, so the render is
    refused rather than sent; ' hello' (another piece, 'Ġhello') renders."""
    from transformers import AutoTokenizer

    from server.models.render import RenderError

    tok = AutoTokenizer.from_pretrained(str(real_tokenizer_dir(GPT2)))
    tok.add_special_tokens({"additional_special_tokens": ["hello"]})
    r = Renderer(tok, family("cut"), template_source="{{ messages[0].content }}", template_name="t")
    with pytest.raises(RenderError, match="would tokenize to a control token"):
        r.render_chat([Message("user", "hello there")])
    ok = r.render_chat([Message("user", "say hello")])
    assert r.count_control_ids(ok.token_ids) == 1
