"""Prompt log-likelihoods as vLLM's server gives them (issue 33, item 1), on the session's
gateway (real vLLM, the default model): ``echo`` with ``logprobs`` covers the prompt's
tokens (the first null), ``max_tokens: 0`` with ``echo`` scores without generating, and
``prompt_logprobs`` on completions and chat. Before, ``echo`` + ``logprobs`` returned the
generated token's log-probability only, and a log-likelihood evaluation read garbage from
it without any error.

The numbers are checked against the engine itself: the log-probability the engine gives
a token it generates greedily equals the one it gives the same token as the last of a
prompt (the same weights read the same prefix)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway

PROMPT = "The capital of France is"


def complete(gateway: Gateway, **fields: Any) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/v1/completions",
        json={"model": gateway.model, "temperature": 0, **fields},
        timeout=120,
    )


def hi(gateway: Gateway, **fields: Any) -> dict[str, Any]:
    """A one-token chat answer to "Hi"."""
    messages = [{"role": "user", "content": "Hi"}]
    body = {"model": gateway.model, "messages": messages, "max_tokens": 1, **fields}
    r = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return dict(r.json())


def ids_of(gateway: Gateway, prompt: str) -> list[int]:
    r = httpx.post(
        f"{gateway.url}/v1/render", json={"model": gateway.model, "prompt": prompt}, timeout=30
    )
    assert r.status_code == 200, r.text
    return list(r.json()["token_ids"])


def test_echo_with_logprobs_covers_the_prompt(gateway: Gateway) -> None:
    ids = ids_of(gateway, PROMPT)
    r = complete(gateway, prompt=PROMPT, max_tokens=1, logprobs=2, echo=True)
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1  # every prompt token, then the generated one
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(x <= 0 for x in lp["token_logprobs"][1:])
    for token, logprob, top in zip(
        lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True
    ):
        assert top[token] == logprob  # the token itself, then the 2 most likely
        assert 1 <= len(top) <= 3
    assert "".join(lp["tokens"]) == choice["text"]
    assert choice["text"].startswith(PROMPT)
    offsets = lp["text_offset"]
    assert offsets == sorted(offsets) and offsets[0] == 0


def test_a_generated_token_scores_the_same_as_a_prompt_token(gateway: Gateway) -> None:
    """lm-eval's loglikelihood path: context + continuation as token ids, ``echo``,
    ``logprobs: 1``, ``max_tokens`` 0 or 1; the continuation's log-probabilities read from
    the echoed prompt."""
    ids = ids_of(gateway, PROMPT)
    generated = complete(gateway, prompt=ids, max_tokens=1, logprobs=1)
    assert generated.status_code == 200, generated.text
    gen = generated.json()["choices"][0]["logprobs"]
    (greedy_logprob,) = gen["token_logprobs"]
    (greedy_token,) = gen["tokens"]
    greedy_id = ids_of(gateway, PROMPT + greedy_token)[len(ids)]

    for max_tokens in (0, 1):
        scored = complete(
            gateway, prompt=[*ids, greedy_id], max_tokens=max_tokens, logprobs=1, echo=True
        )
        assert scored.status_code == 200, scored.text
        choice = scored.json()["choices"][0]
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1 + max_tokens
        last = lp["token_logprobs"][len(ids)]
        assert last == pytest.approx(greedy_logprob, abs=2e-3), (last, greedy_logprob)
        # Greedy: the continuation is the most likely token at its position.
        assert max(lp["top_logprobs"][len(ids)].values()) == last
        if max_tokens == 0:
            assert choice["text"] == PROMPT + greedy_token  # the prompt only
            assert scored.json()["usage"]["prompt_tokens"] == len(ids) + 1


def test_prompt_logprobs_on_completions_and_chat(gateway: Gateway) -> None:
    ids = ids_of(gateway, PROMPT)
    r = complete(gateway, prompt=PROMPT, max_tokens=1, prompt_logprobs=2)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["logprobs"] is None  # not asked
    scored = choice["prompt_logprobs"]
    assert len(scored) == len(ids) and scored[0] is None
    for token_id, position in zip(ids[1:], scored[1:], strict=True):
        assert next(iter(position)) == str(token_id)  # the prompt's own token first
        assert 1 <= len(position) <= 3
        assert all(set(v) == {"logprob", "rank", "decoded_token"} for v in position.values())
        assert sorted(v["rank"] for v in position.values())[0] == 1 or len(position) == 3

    chat = hi(gateway, prompt_logprobs=0)
    rendered = httpx.post(
        f"{gateway.url}/v1/render",
        json={"model": gateway.model, "messages": [{"role": "user", "content": "Hi"}]},
        timeout=30,
    ).json()
    assert len(chat["prompt_logprobs"]) == len(rendered["token_ids"])
    assert chat["prompt_logprobs"][0] is None
    assert all(len(p) == 1 for p in chat["prompt_logprobs"][1:])  # k = 0: the token itself
    assert "prompt_logprobs" not in hi(gateway)  # only when asked
    # Kept over a longer answer (vLLM's later deltas carry an empty list).
    longer = hi(gateway, prompt_logprobs=0, max_tokens=6)
    assert longer["prompt_logprobs"] == chat["prompt_logprobs"]


def test_echo_streams_the_prompt_and_its_logprobs_first(gateway: Gateway) -> None:
    ids = ids_of(gateway, PROMPT)
    chunks = []
    with httpx.stream(
        "POST",
        f"{gateway.url}/v1/completions",
        json={
            "model": gateway.model,
            "prompt": PROMPT,
            "max_tokens": 0,
            "echo": True,
            "logprobs": 1,
            "stream": True,
        },
        timeout=120,
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line.removeprefix("data: ")))
    texts = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert texts == PROMPT
    first = chunks[0]["choices"][0]["logprobs"]
    assert len(first["tokens"]) == len(ids) and first["token_logprobs"][0] is None


def test_what_cannot_be_answered_exactly_is_refused(gateway: Gateway) -> None:
    no_echo = complete(gateway, prompt=PROMPT, max_tokens=0)
    assert no_echo.status_code == 400 and no_echo.json()["error"]["param"] == "max_tokens"
    streamed = complete(gateway, prompt=PROMPT, max_tokens=1, prompt_logprobs=1, stream=True)
    assert streamed.status_code == 400
    assert streamed.json()["error"]["param"] == "prompt_logprobs"
    too_many = complete(gateway, prompt=PROMPT, max_tokens=1, prompt_logprobs=21)
    assert too_many.status_code == 400
    assert too_many.json()["error"]["param"] == "prompt_logprobs"


def test_prompts_scored_beside_other_traffic_on_a_lora_engine(gateway: Gateway) -> None:
    """vLLM 0.32 with LoRA on scores a prompt through the LoRA logits layer with the batch's
    per-request indices: two requests in the batch and the engine core died (the fuzzer
    found it: 3 prompts with ``prompt_logprobs`` beside a decoding request). The gateway
    scores such a prompt alone (``engine.scoring_gate``); everything is answered."""
    import asyncio

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as http:
            url = f"{gateway.url}/v1/completions"
            long = asyncio.create_task(
                http.post(url, json={"model": gateway.model, "prompt": "Once", "max_tokens": 48})
            )
            await asyncio.sleep(0.3)  # decoding when the scored prompts arrive
            scored = [
                http.post(
                    url,
                    json={
                        "model": gateway.model,
                        "prompt": ["The sea is", "Paris is a city", "One two three four"],
                        "prompt_logprobs": 0,
                        "max_tokens": 4,
                    },
                )
                for _ in range(2)
            ]
            echoed = http.post(
                url,
                json={
                    "model": gateway.model,
                    "prompt": PROMPT,
                    "echo": True,
                    "logprobs": 1,
                    "max_tokens": 0,
                },
            )
            return list(await asyncio.gather(long, *scored, echoed))

    answers = asyncio.run(run())
    assert [a.status_code for a in answers] == [200] * len(answers), [a.text for a in answers]
    for answer in answers[1:3]:
        for choice in answer.json()["choices"]:
            scored = choice["prompt_logprobs"]
            assert scored and scored[0] is None and len(scored) > 1, answer.json()
    assert httpx.get(f"{gateway.url}/health", timeout=10).json()["status"] == "ok"
