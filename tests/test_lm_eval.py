"""lm-evaluation-harness against the gateway and against raw ``vllm serve`` of the same
checkpoint, both of its API paths (issue 33, item 2): a multiple-choice task through
``local-completions`` (``loglikelihood``: ``echo`` + ``logprobs`` + ``max_tokens`` 1 on
token-id prompts) and a generation task through ``local-chat-completions``
(``generate_until``). Each item's log-likelihoods agree within 1e-3 and the metrics are
identical. Before, the multiple-choice path ran without an error and scored garbage.

The tasks are defined here over local data (``tests/lm_eval/``): no dataset is downloaded.
The session's gateway (the README's ``aligngate serve``) and raw vLLM with its engine
settings (LoRA on, the same context length, dtype and KV cache) are asked in turn.

The same raw server answers ``/tokenize`` and ``/detokenize`` beside the gateway (issue 33,
item 6): the same ids, counts and strings for text prompts and chat messages."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from loadtest.servers import (
    DEFAULT_LORA_FLAGS,
    DEFAULT_MAX_MODEL_LEN,
    RunningServer,
    engine_env,
    raw_vllm,
)
from tests.conftest import Gateway

pytestmark = pytest.mark.slow

DATA = Path(__file__).parent / "lm_eval"
MULTIPLE_CHOICE = "aligngate_general_knowledge"
GENERATION = "aligngate_capitals"


def _task_files(folder: Path) -> Path:
    """The two tasks' configs, naming the local data by absolute path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{MULTIPLE_CHOICE}.yaml").write_text(
        f"""task: {MULTIPLE_CHOICE}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {DATA / "general_knowledge.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""
    )
    (folder / f"{GENERATION}.yaml").write_text(
        f"""task: {GENERATION}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {DATA / "capitals.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}} Answer with one word."
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 8
  do_sample: false
filter_list:
  - name: first_word
    filter:
      - function: regex
        regex_pattern: "([A-Z][a-z]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    ignore_case: true
"""
    )
    return folder


def _evaluate(base_url: str, model: str, tokenizer: Path, tasks: Path) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    common = {"model": model, "num_concurrent": 1, "max_retries": 1, "timeout": 120}
    scored = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            **common,
            "base_url": f"{base_url}/v1/completions",
            "tokenizer": str(tokenizer),
            "tokenized_requests": True,
        },
        tasks=[MULTIPLE_CHOICE],
        task_manager=manager,
        log_samples=True,
    )
    generated = lm_eval.simple_evaluate(
        model="local-chat-completions",
        model_args={**common, "base_url": f"{base_url}/v1/chat/completions"},
        tasks=[GENERATION],
        task_manager=manager,
        apply_chat_template=True,
        log_samples=True,
    )
    assert scored is not None and generated is not None
    return {
        "metrics": {
            MULTIPLE_CHOICE: scored["results"][MULTIPLE_CHOICE],
            GENERATION: generated["results"][GENERATION],
        },
        # Per item: each choice's (log-likelihood, greedy?); the generation's text.
        "loglikelihoods": [
            [resp[0] for resp in s["resps"]] for s in scored["samples"][MULTIPLE_CHOICE]
        ],
        "generations": [s["resps"][0][0] for s in generated["samples"][GENERATION]],
    }


@pytest.fixture(scope="module")
def offline() -> Iterator[None]:
    """Nothing is downloaded: the datasets library reads the local files only."""
    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update({"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def vllm_url(
    gateway: Gateway, default_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Raw ``vllm serve`` of the gateway's checkpoint under the gateway's model name."""
    spec = raw_vllm(
        default_model_path,
        gateway.model,
        DEFAULT_MAX_MODEL_LEN,
        engine_env(1, {}),
        DEFAULT_LORA_FLAGS,
    )
    server = RunningServer(spec, tmp_path_factory.mktemp("raw-vllm") / "vllm.log")
    try:
        server.wait_ready(gateway.model)
        yield spec.base_url
    finally:
        server.stop()


def test_lm_eval_scores_the_same_through_the_gateway_as_through_vllm(
    gateway: Gateway, vllm_url: str, default_model_path: Path, tmp_path: Path, offline: None
) -> None:
    tasks = _task_files(tmp_path / "tasks")
    through_gateway = _evaluate(gateway.url, gateway.model, default_model_path, tasks)
    through_vllm = _evaluate(vllm_url, gateway.model, default_model_path, tasks)

    print("lm-eval through the gateway:", through_gateway["metrics"])
    print("lm-eval through raw vLLM:   ", through_vllm["metrics"])
    ours, theirs = through_gateway["loglikelihoods"], through_vllm["loglikelihoods"]
    assert len(ours) == len(theirs) == 20
    worst = 0.0
    for item_ours, item_theirs in zip(ours, theirs, strict=True):
        assert len(item_ours) == len(item_theirs) == 4
        for (ll, greedy), (ll_vllm, greedy_vllm) in zip(item_ours, item_theirs, strict=True):
            worst = max(worst, abs(ll - ll_vllm))
            assert greedy == greedy_vllm
    print(f"largest per-choice log-likelihood difference: {worst:.2e} nats")
    assert worst < 1e-3
    assert through_gateway["generations"] == through_vllm["generations"]
    assert through_gateway["metrics"] == through_vllm["metrics"]
    # A checkpoint that answers "Paris" scores above chance on its own task.
    assert through_gateway["metrics"][MULTIPLE_CHOICE]["acc,none"] > 0.25


TOKENIZE_BODIES: list[dict[str, Any]] = [
    {"prompt": "The capital of France is"},
    {"prompt": "<|im_start|>user\nHi<|im_end|>", "add_special_tokens": False},
    {"prompt": "Émile's café: 3.14 — ok?", "return_token_strs": True},
    {"messages": [{"role": "user", "content": "What is the capital of France?"}]},
    {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Name a planet."},
            {"role": "assistant", "content": "Mars."},
            {"role": "user", "content": "Another?"},
        ],
        "return_token_strs": True,
    },
    # vLLM's chat options: an assistant prefill, no generation prompt, template variables.
    {
        "messages": [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is"},
        ],
        "continue_final_message": True,
        "add_generation_prompt": False,
    },
    {"messages": [{"role": "user", "content": "Hi"}], "add_generation_prompt": False},
    {"messages": [{"role": "user", "content": "Hi"}], "chat_template_kwargs": {"x": "y"}},
]


def test_tokenize_and_detokenize_answer_as_vllms(gateway: Gateway, vllm_url: str) -> None:
    for body in TOKENIZE_BODIES:
        answers = [
            httpx.post(f"{url}/tokenize", json={"model": gateway.model, **body}, timeout=30)
            for url in (gateway.url, vllm_url)
        ]
        assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
        ours, theirs = (a.json() for a in answers)
        assert ours == theirs, body
        assert ours["count"] == len(ours["tokens"]) > 0
        assert (ours["token_strs"] is not None) == bool(body.get("return_token_strs"))

        back = [
            httpx.post(
                f"{url}/detokenize",
                json={"model": gateway.model, "tokens": ours["tokens"]},
                timeout=30,
            ).json()
            for url in (gateway.url, vllm_url)
        ]
        assert back[0] == back[1], body
        if "prompt" in body:
            assert back[0]["prompt"] == body["prompt"]


def _sse(url: str, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream("POST", f"{url}{path}", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        lines = [line.removeprefix("data: ") for line in r.iter_lines() if line.strip()]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_return_token_ids_answers_as_vllms(gateway: Gateway, vllm_url: str) -> None:
    """``return_token_ids`` (issue 33, item 4): the prompt's ids and each choice's generated
    ids, whole and streamed, as raw vLLM gives them for the same greedy request."""
    asks = [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Name a planet."}]}),
        ("/v1/completions", {"prompt": "The capital of France is"}),
        ("/v1/completions", {"prompt": "The capital of France is", "echo": True}),
    ]
    for path, ask in asks:
        body = {"model": gateway.model, **ask, "max_tokens": 8, "temperature": 0}
        body["return_token_ids"] = True
        ours, theirs = (
            httpx.post(f"{url}{path}", json=body, timeout=60).json()
            for url in (gateway.url, vllm_url)
        )
        if path == "/v1/chat/completions":
            assert ours["prompt_token_ids"] == theirs["prompt_token_ids"]
            assert (
                ours["choices"][0]["message"]["content"]
                == (theirs["choices"][0]["message"]["content"])
            )
        else:
            fields = ("prompt_token_ids", "text")
            assert [ours["choices"][0][f] for f in fields] == [
                theirs["choices"][0][f] for f in fields
            ], ask
        ids = ours["choices"][0]["token_ids"]
        assert ids == theirs["choices"][0]["token_ids"] and len(ids) > 0, ask

        # Streamed: the prompt's ids once, each chunk's new ids, the same ids in all.
        for url in (gateway.url, vllm_url):
            chunks = _sse(url, path, body)
            key = "prompt_token_ids"
            prompt_ids = [c[key] for c in chunks if c.get(key)] + [
                ch[key] for c in chunks for ch in c["choices"] if ch.get(key)
            ]
            expected = ours.get(key) or ours["choices"][0][key]
            assert prompt_ids == [expected], (url, ask)
            streamed = [t for c in chunks for ch in c["choices"] for t in ch.get("token_ids") or []]
            assert streamed == ids, (url, ask)

    # Without it, the fields are absent from the gateway's answer, as vLLM's are null.
    plain = httpx.post(
        f"{gateway.url}/v1/completions",
        json={"model": gateway.model, "prompt": "Hi", "max_tokens": 2},
        timeout=60,
    ).json()
    assert "token_ids" not in plain["choices"][0]


def test_an_assistant_prefill_is_continued_as_vllm_continues_it(
    gateway: Gateway, vllm_url: str
) -> None:
    """``continue_final_message`` (issue 33, item 4): the model continues the assistant's
    message; the same greedy continuation and prompt as raw vLLM's."""
    body = {
        "model": gateway.model,
        "messages": [
            {"role": "user", "content": "Name the largest planet."},
            {"role": "assistant", "content": "The largest planet is"},
        ],
        "continue_final_message": True,
        "add_generation_prompt": False,
        "max_tokens": 12,
        "temperature": 0,
    }
    ours, theirs = (
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
        for url in (gateway.url, vllm_url)
    )
    assert ours["usage"]["prompt_tokens"] == theirs["usage"]["prompt_tokens"]
    answer = ours["choices"][0]["message"]["content"]
    assert answer == theirs["choices"][0]["message"]["content"] and answer.strip(), (ours, theirs)
    # A continuation, not a new answer: it does not restate the prefill.
    assert not answer.lstrip().startswith("The largest planet is")
