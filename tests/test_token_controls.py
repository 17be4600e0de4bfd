"""vLLM's token controls on the session's gateway (issue 33, item 4): ``logit_bias``,
``stop_token_ids``, ``include_stop_str_in_output`` and ``skip_special_tokens``, with vLLM's
meanings. Before, each was a 400. Expectations come from the model's own greedy answers, so
they hold whatever the CPU's arithmetic makes of the small model."""

from __future__ import annotations

from typing import Any

import httpx

from tests.conftest import Gateway

PROMPT = "The capital of France is"


def complete(gateway: Gateway, **fields: Any) -> dict[str, Any]:
    body = {"model": gateway.model, "prompt": PROMPT, "temperature": 0, **fields}
    r = httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return dict(r.json())


def first_token(gateway: Gateway, **fields: Any) -> str:
    reply = complete(gateway, max_tokens=1, logprobs=0, **fields)
    return str(reply["choices"][0]["logprobs"]["tokens"][0])


def test_logit_bias_forces_and_forbids_a_token(gateway: Gateway, tokenizer) -> None:  # type: ignore[no-untyped-def]
    banana = tokenizer.encode(" banana", add_special_tokens=False)[0]
    assert first_token(gateway, logit_bias={str(banana): 100}) == tokenizer.decode([banana])
    greedy = first_token(gateway)
    greedy_id = tokenizer.encode(PROMPT + greedy, add_special_tokens=False)[
        len(tokenizer.encode(PROMPT, add_special_tokens=False))
    ]
    assert first_token(gateway, logit_bias={str(greedy_id): -100}) != greedy


def test_stop_token_ids_end_the_answer(gateway: Gateway, tokenizer) -> None:  # type: ignore[no-untyped-def]
    banana = tokenizer.encode(" banana", add_special_tokens=False)[0]
    reply = complete(gateway, max_tokens=8, logit_bias={str(banana): 100}, stop_token_ids=[banana])
    (choice,) = reply["choices"]
    assert choice["finish_reason"] == "stop"
    assert reply["usage"]["completion_tokens"] == 1


def test_a_matched_stop_string_stays_when_asked(gateway: Gateway) -> None:
    text = complete(gateway, max_tokens=12)["choices"][0]["text"]
    stop = text.strip()[1:4]  # three characters from inside the greedy answer
    assert len(stop) == 3 and stop in text
    cut = complete(gateway, max_tokens=12, stop=[stop])["choices"][0]
    kept = complete(gateway, max_tokens=12, stop=[stop], include_stop_str_in_output=True)
    assert cut["finish_reason"] == "stop" and not cut["text"].endswith(stop)
    assert kept["choices"][0]["text"] == cut["text"] + stop


def test_special_tokens_are_shown_when_asked(gateway: Gateway, tokenizer) -> None:  # type: ignore[no-untyped-def]
    special = next(t for t in tokenizer.all_special_tokens if t != tokenizer.eos_token)
    special_id = tokenizer.convert_tokens_to_ids(special)
    forced = {"max_tokens": 2, "logit_bias": {str(special_id): 100}, "ignore_eos": True}
    hidden = complete(gateway, **forced)["choices"][0]["text"]
    shown = complete(gateway, skip_special_tokens=False, **forced)["choices"][0]["text"]
    assert special not in hidden and special in shown


def test_bad_token_controls_are_400s_naming_them(gateway: Gateway, tokenizer) -> None:  # type: ignore[no-untyped-def]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"logit_bias": {"Paris": 5}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {str(10**9): 5}}, ""),  # beyond the vocabulary: vLLM refuses it
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ]
    for fields, param in cases:
        body = {"model": gateway.model, "prompt": PROMPT, "max_tokens": 2, **fields}
        r = httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 400, (fields, r.text)
        if param:
            assert r.json()["error"]["param"] == param, r.json()
