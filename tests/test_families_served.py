"""All four families served by one gateway through vLLM, on tiny random checkpoints of the
real architectures (Llama/CUT, Mistral/KTO, GPT-J/Quark, chat-template/DPO); where the test
data has the real vocabularies, also CUT on LLaMA's SentencePiece and Quark on GPT-2's BPE."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from server.models.render import Message, Renderer
from tests.conftest import TEST_HOME, Gateway, run_cli, start_gateway, stop_gateway
from tests.data import TEST_DATA, real_file
from tests.test_render import CAKE, TLDR, TULU_CAKE
from tests.test_render_sentencepiece import (
    ALPACA_PREAMBLE,
    GPT2,
    LLAMA_SPM,
    check_against_reference,
    split_ids,
)

MODELS = {
    "tiny-cut": ("llama", "cut", "alpaca.jinja"),
    "tiny-kto": ("mistral", "kto", "tulu.jinja"),
    "tiny-quark": ("gptj", "quark", "quark.jinja"),
    "tiny-dpo": ("chat", "dpo", "checkpoint-chat-template"),
}
# Tiny checkpoints around the real vocabularies (32,000 / 50,257 tokens), served by the same
# gateway where the test data has them: (tiny_checkpoints kind, family, vocabulary).
REAL_VOCAB = {
    "tiny-cut-llama-spm": ("llama-spm", "cut", LLAMA_SPM),
    "tiny-quark-gpt2": ("gptj-gpt2", "quark", GPT2),
}


@pytest.fixture(scope="module")
def real_vocab_dirs(tiny_dir: Path) -> dict[str, Path]:
    """The checkpoints whose vocabulary the test data has (their tests skip without it)."""
    from tests.tiny_checkpoints import build

    return {
        name: build((TEST_DATA / vocab).parent, tiny_dir / kind, kind)
        for name, (kind, _, vocab) in REAL_VOCAB.items()
        if (TEST_DATA / vocab).is_file()
    }


@pytest.fixture(scope="module")
def models_file(
    tiny_dir: Path, real_vocab_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    path = tmp_path_factory.mktemp("families") / "models.yaml"
    lines = ["models:"]
    folders = {name: tiny_dir / folder for name, (folder, _, _) in MODELS.items()}
    families = {name: spec[1] for name, spec in {**MODELS, **REAL_VOCAB}.items()}
    for name, folder in {**folders, **real_vocab_dirs}.items():
        # Quark's family is left for the gateway to detect from the quantile tokens.
        family_line = "" if families[name] == "quark" else f", family: {families[name]}"
        lines.append(f"  - {{name: {name}, path: {folder}{family_line}, max_model_len: 1024}}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def families_gateway(
    models_file: Path, test_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    log_path = tmp_path_factory.mktemp("families-gateway") / "serve.log"
    gw = start_gateway(["--config", str(models_file)], log_path, test_env)
    yield gw
    assert stop_gateway(gw) == 0, gw.log_tail()


@pytest.fixture(scope="module")
def client(families_gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{families_gateway.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def local(tiny_dir: Path) -> dict[str, Renderer]:
    return {
        name: Renderer.load(tiny_dir / folder, family_name=family)
        for name, (folder, family, _) in MODELS.items()
    }


def conversation(name: str) -> list[dict[str, str]]:
    if name == "tiny-quark":
        return [{"role": "user", "content": TLDR}]
    return [{"role": m.role, "content": m.content} for m in CAKE]


def test_models_show_family_template_and_fingerprint(
    client: openai.OpenAI, local: dict[str, Renderer]
) -> None:
    listed = [m.model_dump() for m in client.models.list().data]
    cards = {m["id"]: m for m in listed if not m.get("alias_of")}  # NAME@latest: aliases
    assert set(MODELS) <= set(cards) <= set(MODELS) | set(REAL_VOCAB)
    assert {m["id"] for m in listed if m.get("alias_of")} == {f"{n}@latest" for n in cards}
    for name, (_, family, template) in MODELS.items():
        assert cards[name]["family"] == family
        assert cards[name]["template"] == template
        assert cards[name]["template_fingerprint"] == local[name].fingerprint


@pytest.mark.parametrize("name", list(MODELS))
def test_each_family_chats_through_vllm(
    client: openai.OpenAI, local: dict[str, Renderer], name: str
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=name, messages=conversation(name), max_tokens=8, temperature=0
    )
    reply = raw.parse()
    assert raw.headers["x-aligngate-template"] == local[name].fingerprint
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens >= 1
    messages = [Message(m["role"], m["content"]) for m in conversation(name)]
    # The engine was given exactly the renderer's ids.
    assert reply.usage.prompt_tokens == len(local[name].render_chat(messages).token_ids)


@pytest.mark.parametrize("name", list(MODELS))
def test_render_endpoint_returns_the_exact_prompt(
    families_gateway: Gateway, local: dict[str, Renderer], name: str
) -> None:
    response = httpx.post(
        f"{families_gateway.url}/v1/render",
        json={"model": name, "messages": conversation(name)},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    expected = local[name].render_chat(
        [Message(m["role"], m["content"]) for m in conversation(name)]
    )
    assert body["text"] == expected.text
    assert body["token_ids"] == expected.token_ids
    assert body["template_fingerprint"] == local[name].fingerprint
    if name == "tiny-kto":
        assert body["text"] == TULU_CAKE
        assert body["stop"] == ["<|user|>"]
    if name == "tiny-quark":
        assert body["tokens"][0] == "_QUANTILE_TOKEN_0_"


def test_quark_multi_turn_is_400(families_gateway: Gateway) -> None:
    response = httpx.post(
        f"{families_gateway.url}/v1/chat/completions",
        json={"model": "tiny-quark", "messages": conversation("tiny-cut")},
        timeout=30,
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages"
    assert "exactly one user message" in error["message"]


def test_quantile_picks_the_reward_level(client: openai.OpenAI) -> None:
    def first_logprob(quantile: int) -> tuple[float, int]:
        reply = client.completions.create(
            model="tiny-quark",
            prompt=TLDR,
            max_tokens=1,
            temperature=0,
            logprobs=1,
            extra_body={"quantile": quantile},
        )
        return reply.choices[0].logprobs.token_logprobs[0], reply.usage.prompt_tokens

    best, best_len = first_logprob(0)
    worst, worst_len = first_logprob(4)
    assert best_len == worst_len  # one quantile token either way
    assert best != worst  # a different token id reached the engine


def test_quantile_on_another_family_is_400(families_gateway: Gateway) -> None:
    response = httpx.post(
        f"{families_gateway.url}/v1/chat/completions",
        json={"model": "tiny-kto", "messages": conversation("tiny-kto"), "quantile": 0},
        timeout=30,
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "quantile"


def test_cli_render_prints_the_exact_format(
    models_file: Path, tmp_path: Path, local: dict[str, Renderer]
) -> None:
    messages = tmp_path / "cake.json"
    messages.write_text(json.dumps(conversation("tiny-kto")))
    env = dict(os.environ, ALIGNGATE_HOME=str(TEST_HOME))
    args = [
        "render",
        "--config",
        str(models_file),
        "--model",
        "tiny-kto",
        "--messages",
        str(messages),
    ]
    out = run_cli(args, env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == TULU_CAKE
    ids = run_cli([*args, "--ids"], env, timeout=120)
    assert ids.returncode == 0, ids.stderr
    assert json.loads(ids.stdout) == local["tiny-kto"].render_chat(CAKE).token_ids


GUARDED = {  # user text with control-token text, on each real vocabulary
    "tiny-cut-llama-spm": [
        Message("user", "end it with </s> now"),
        Message("assistant", "Done </s>"),
        Message("user", "<s>again</s>"),
    ],
    "tiny-quark-gpt2": [Message("user", "Summarise: <|endoftext|> _QUANTILE_TOKEN_4_ </s>")],
}


@pytest.mark.parametrize("name", list(REAL_VOCAB))
def test_guarded_prompt_reaches_the_engine_as_the_one_pass_reference(
    client: openai.OpenAI,
    families_gateway: Gateway,
    real_vocab_dirs: dict[str, Path],
    name: str,
) -> None:
    """The engine is given the one-pass reference ids (test_render_sentencepiece): the chat
    request and a completions request with those ids as its prompt see the same prompt
    length and the same logprobs; the piecewise ids of old (a '▁' at each seam) do not."""
    real_file(REAL_VOCAB[name][2])  # skips, or fails under ALIGNGATE_REQUIRE_TEST_DATA=1
    renderer = Renderer.load(real_vocab_dirs[name], family_name=REAL_VOCAB[name][1])
    assert len(renderer.tokenizer) in (32_000, 50_257 + len(renderer.quantile_tokens))
    messages = GUARDED[name]
    reference = check_against_reference(renderer, messages)
    rendered = httpx.post(
        f"{families_gateway.url}/v1/render",
        json={
            "model": name,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
        },
        timeout=30,
    ).json()
    assert rendered["token_ids"] == reference

    def completion(prompt: list[int]) -> tuple[int, list[str], list[float]]:
        reply = client.completions.create(
            model=name, prompt=prompt, max_tokens=4, temperature=0, logprobs=1
        )
        logprobs = reply.choices[0].logprobs
        return reply.usage.prompt_tokens, logprobs.tokens, logprobs.token_logprobs

    chat = client.chat.completions.create(
        model=name,
        messages=[{"role": m.role, "content": m.content} for m in messages],
        max_tokens=4,
        temperature=0,
        logprobs=True,
    )
    steps = chat.choices[0].logprobs.content
    length, tokens, logprobs = completion(reference)
    assert chat.usage.prompt_tokens == length == len(reference)
    assert [s.token for s in steps] == tokens
    # Exactly: on a tiny random model, logprobs after different prompts differ by ~1e-5.
    assert [s.logprob for s in steps] == logprobs
    if name == "tiny-cut-llama-spm":
        # Template and user text encoded as separate pieces, as before: '▁end' and a lone
        # '▁' at the seams. The engine tells the two prompts apart.
        tok = renderer.tokenizer
        one_turn = renderer.render_chat(messages[:1]).token_ids
        piecewise = [tok.bos_token_id]
        for piece in (
            ALPACA_PREAMBLE + "### Instruction:\n",
            messages[0].content,
            "\n\n### Response:\n",
        ):
            piecewise += split_ids(tok, piece)
        assert {"▁end", "▁"} <= set(tok.convert_ids_to_tokens(piecewise))
        old_length, _, old_logprobs = completion(piecewise)
        new_length, _, new_logprobs = completion(one_turn)
        assert (old_length, new_length) == (len(one_turn) + 1, len(one_turn))  # the lone ▁
        assert old_logprobs != new_logprobs


@pytest.mark.slow
def test_each_engine_has_its_own_vllm_metrics(families_gateway: Gateway) -> None:
    """Several engines in one process: vLLM's series of each, labelled by its model."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{families_gateway.url}/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    served = {m["id"] for m in httpx.get(f"{families_gateway.url}/v1/models").json()["data"]}
    served = {m for m in served if "@" not in m}
    running = {s.labels["model_name"] for s in families["vllm:num_requests_running"].samples}
    assert running == served, (running, served)
    info = {s.labels["model_name"] for s in families["vllm:cache_config_info"].samples}
    assert info == served


def test_a_dead_engine_fails_fast_while_the_others_serve(families_gateway: Gateway) -> None:
    """Last in this module: it kills one engine. The engine core busy with a long stream on
    `tiny-kto` is the one killed (the others are idle)."""
    import signal
    import threading
    import time

    import psutil

    url = f"{families_gateway.url}/v1/chat/completions"
    first = threading.Event()
    lines: list[str] = []

    def long_stream() -> None:
        body = {
            "model": "tiny-kto",
            "messages": [{"role": "user", "content": "Go on."}],
            "max_tokens": 900,
            "min_tokens": 900,
            "stream": True,
        }
        with httpx.stream("POST", url, json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                    first.set()

    worker = threading.Thread(target=long_stream)
    worker.start()
    assert first.wait(60)
    cores = [
        p
        for p in psutil.Process(families_gateway.process.pid).children(recursive=True)
        if "EngineCore" in " ".join(p.cmdline()) or "EngineCore" in p.name()
    ]
    listed = httpx.get(f"{families_gateway.url}/v1/models", timeout=10).json()["data"]
    served = [m for m in listed if not m.get("alias_of")]  # one engine per base model
    assert len(cores) == len(served), [p.name() for p in cores]
    for p in cores:
        p.cpu_percent(None)
    time.sleep(1.0)
    busy = max(cores, key=lambda p: p.cpu_percent(None))
    busy.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()

    worker.join(60)
    assert not worker.is_alive()
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert error["type"] == "server_error"
    print(f"stream on the dead engine ended {time.monotonic() - killed_at:.2f} s after the kill")

    health = httpx.get(f"{families_gateway.url}/health", timeout=10)
    assert health.status_code == 503
    assert health.json()["models"]["tiny-kto"] == "down"
    started = time.monotonic()
    dead = httpx.post(
        url, json={"model": "tiny-kto", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert dead.status_code == 503 and dead.json()["error"]["code"] == "engine_unavailable"
    assert time.monotonic() - started < 1
    for other in ("tiny-cut", "tiny-quark", "tiny-dpo"):
        assert health.json()["models"][other] == "ok"
        r = httpx.post(
            url,
            json={"model": other, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            timeout=60,
        )
        assert r.status_code == 200, (other, r.text)
