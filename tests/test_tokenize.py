"""``/tokenize`` and ``/detokenize`` on the session's gateway: the ids are those the engine is
sent (the chat route's prompt token count and ``/v1/render``'s ids), and every field of
vLLM's request the gateway cannot render is refused by name. Agreement with raw
``vllm serve`` is in ``test_lm_eval.py`` (one raw server for both)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import Gateway

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def _post(gateway: Gateway, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{gateway.url}{path}", json=body, timeout=60)


def test_chat_ids_are_the_ids_the_engine_is_sent(gateway: Gateway) -> None:
    tokenized = _post(gateway, "/tokenize", {"model": gateway.model, "messages": FRANCE})
    assert tokenized.status_code == 200, tokenized.text
    ids = tokenized.json()["tokens"]
    rendered = _post(gateway, "/v1/render", {"model": gateway.model, "messages": FRANCE}).json()
    assert ids == rendered["token_ids"]
    reply = _post(
        gateway,
        "/v1/chat/completions",
        {"model": gateway.model, "messages": FRANCE, "max_tokens": 1, "temperature": 0},
    ).json()
    assert reply["usage"]["prompt_tokens"] == tokenized.json()["count"] == len(ids)
    card = httpx.get(f"{gateway.url}/v1/models/{gateway.model}").json()
    assert tokenized.json()["max_model_len"] == card["max_model_len"]


def test_text_prompt_ids_as_the_tokenizer_gives_them(gateway: Gateway, tokenizer: Any) -> None:
    text = "<|im_start|>user\nThe capital of France is"
    with_specials = _post(gateway, "/tokenize", {"prompt": text, "return_token_strs": True})
    assert with_specials.status_code == 200, with_specials.text  # `model` may be left out
    answer = with_specials.json()
    assert answer["tokens"] == tokenizer(text, add_special_tokens=True)["input_ids"]
    assert answer["token_strs"] == tokenizer.convert_ids_to_tokens(answer["tokens"])
    plain = _post(gateway, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()
    assert plain["tokens"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert plain["token_strs"] is None
    # The completions route scores these ids: its echoed prompt has one token per id.
    echoed = _post(
        gateway,
        "/v1/completions",
        {"model": gateway.model, "prompt": text, "max_tokens": 0, "echo": True, "logprobs": 0},
    ).json()
    assert len(echoed["choices"][0]["logprobs"]["tokens"]) == answer["count"]

    back = _post(gateway, "/detokenize", {"tokens": answer["tokens"]})
    assert back.json() == {"prompt": tokenizer.decode(answer["tokens"])}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"continue_final_message": True}, "add_generation_prompt"),  # vLLM's rule
        ({"continue_final_message": True, "add_generation_prompt": False}, "messages"),
        ({"chat_template": "{{ messages }}"}, "chat_template"),
        ({"chat_template_kwargs": {"tools": "x"}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"nested": {"a": 1}}}, "chat_template_kwargs"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"add_special_tokens": True}, "add_special_tokens"),
    ],
)
def test_chat_fields_it_cannot_render_are_refused_by_name(
    gateway: Gateway, extra: dict[str, Any], param: str
) -> None:
    refused = _post(gateway, "/tokenize", {"model": gateway.model, "messages": FRANCE, **extra})
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_bad_requests_are_openai_errors(gateway: Gateway, tokenizer: Any) -> None:
    cases = [
        ("/tokenize", {"model": gateway.model}, 400, "prompt"),
        ("/tokenize", {"prompt": "a", "messages": FRANCE}, 400, "prompt"),
        ("/tokenize", {"prompt": "a", "continue_final_message": True}, 400, None),
        ("/tokenize", {"model": "nope", "prompt": "a"}, 404, None),
        ("/detokenize", {"tokens": [len(tokenizer) + 5]}, 400, "tokens"),
        ("/detokenize", {"tokens": [-1]}, 400, None),
        ("/detokenize", {"tokens": [1], "surprise": 1}, 400, None),
    ]
    for path, body, status, param in cases:
        answer = _post(gateway, path, body)
        assert answer.status_code == status, (path, body, answer.text)
        error = answer.json()["error"]
        assert error["message"], (path, body)
        if param is not None:
            assert error["param"] == param, (path, body, error)
