"""Bad input gets the OpenAI error object with the right status, never a 500."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Gateway

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def post(gateway: Gateway, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{gateway.url}{path}", json=body, timeout=60, **kwargs)


def assert_openai_error(response: httpx.Response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param
    return error


def test_unknown_model_is_404(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=FRANCE)
    assert caught.value.code == "model_not_found"
    error = assert_openai_error(
        post(gateway, "/v1/completions", {"model": "no-such-model", "prompt": "x"}), 404, "model"
    )
    assert "no-such-model" in error["message"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", -1),
        ("max_tokens", 0),
        ("max_completion_tokens", -5),
        ("temperature", 5),
        ("temperature", -0.1),
        ("top_p", 0),
        ("n", 0),
        ("n", 17),
        ("top_logprobs", 21),
        ("presence_penalty", 3),
        ("stop", [""]),
        ("tools", [{"type": "function", "function": {"name": "f"}}]),  # cannot be honoured
    ],
)
def test_bad_chat_field_is_400_naming_it(gateway: Gateway, field: str, value: Any) -> None:
    body = {"model": gateway.model, "messages": FRANCE, field: value}
    error = assert_openai_error(post(gateway, "/v1/chat/completions", body), 400, field)
    assert error["type"] == "invalid_request_error"


def test_empty_messages_is_400(gateway: Gateway) -> None:
    body = {"model": gateway.model, "messages": []}
    assert_openai_error(post(gateway, "/v1/chat/completions", body), 400, "messages")


def test_bad_role_and_part_are_400(gateway: Gateway) -> None:
    body = {"model": gateway.model, "messages": [{"role": "wizard", "content": "hi"}]}
    error = assert_openai_error(post(gateway, "/v1/chat/completions", body), 400, "messages.0.role")
    assert "wizard" in error["message"] or "role" in error["message"]
    body = {
        "model": gateway.model,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
    }
    assert post(gateway, "/v1/chat/completions", body).status_code == 400


def test_text_parts_are_accepted(gateway: Gateway) -> None:
    body = {
        "model": gateway.model,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Say hi."}]}],
        "max_tokens": 4,
    }
    response = post(gateway, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1


def test_prompt_over_the_context_is_400(gateway: Gateway) -> None:
    long_text = "hello " * 9000  # > 8192 tokens
    body = {"model": gateway.model, "messages": [{"role": "user", "content": long_text}]}
    error = assert_openai_error(post(gateway, "/v1/chat/completions", body), 400, "messages")
    assert error["code"] == "context_length_exceeded"
    error = assert_openai_error(
        post(gateway, "/v1/completions", {"model": gateway.model, "prompt": long_text}),
        400,
        "prompt",
    )
    assert error["code"] == "context_length_exceeded"


def test_prompt_plus_max_tokens_over_the_context_is_400(gateway: Gateway) -> None:
    body = {"model": gateway.model, "messages": FRANCE, "max_tokens": 8190}
    error = assert_openai_error(post(gateway, "/v1/chat/completions", body), 400, "max_tokens")
    assert error["code"] == "context_length_exceeded"
    assert "8192" in error["message"]


def test_invalid_json_and_wrong_types_are_400(gateway: Gateway) -> None:
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert_openai_error(response, 400, None)
    body = {"model": gateway.model, "messages": "hello"}
    assert_openai_error(post(gateway, "/v1/chat/completions", body), 400, "messages")


def test_token_ids_outside_the_vocabulary_are_400(gateway: Gateway) -> None:
    body = {"model": gateway.model, "prompt": [1, 2, 10**9]}
    assert_openai_error(post(gateway, "/v1/completions", body), 400, "prompt")


def test_unknown_route_and_method_use_the_error_schema(gateway: Gateway) -> None:
    assert_openai_error(httpx.get(f"{gateway.url}/v1/nothing-here", timeout=10), 404, None)
    # (GET /v1/chat/completions is the Stored Completions list.)
    wrong = httpx.delete(f"{gateway.url}/v1/chat/completions", timeout=10)
    assert_openai_error(wrong, 405, None)


def test_request_limits_name_the_parameter(gateway: Gateway) -> None:
    chat = {"model": gateway.model, "max_tokens": 2}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"messages": [{"role": "user", "content": "a\x00b"}]}, "messages.0.content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "\x00"}]}]},
            "messages.0.content",
        ),
        ({"messages": FRANCE, "chat_template": "{{ 'x' }}"}, "chat_template"),
        ({"messages": FRANCE, "chat_template_kwargs": {"x": [1]}}, "chat_template_kwargs"),
        ({"messages": FRANCE, "continue_final_message": True}, "add_generation_prompt"),
        ({"messages": [{"role": "user", "content": "hi"}] * 513}, "messages"),
        ({"messages": [{"role": "user", "content": "x" * 200_001}]}, "messages.0"),
        ({"messages": FRANCE, "stop": ["x" * 257]}, "stop"),
        ({"messages": FRANCE, "user": "u\x00"}, "user"),
    ]
    for extra, param in cases:
        assert_openai_error(post(gateway, "/v1/chat/completions", {**chat, **extra}), 400, param)
    feedback = {"completion_id": "chatcmpl-x", "judgment": "bad\x00"}
    assert_openai_error(post(gateway, "/v1/feedback", feedback), 400, "judgment")
    prompt = {"model": gateway.model, "prompt": "a\x00", "max_tokens": 2}
    assert_openai_error(post(gateway, "/v1/completions", prompt), 400, "prompt")
    # Found by the fuzzer: an empty prompt (no BOS for this model) used to reach vLLM → 500.
    empty = {"model": gateway.model, "prompt": "", "max_tokens": 2}
    assert_openai_error(post(gateway, "/v1/completions", empty), 400, "prompt")


def test_non_finite_numbers_and_bad_bytes_are_400(gateway: Gateway) -> None:
    url = f"{gateway.url}/v1/chat/completions"
    for raw in (
        b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
        b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}',
        b'{"model": "%s", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
    ):
        body = raw.replace(b"%s", gateway.model.encode())
        r = httpx.post(url, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, (raw, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_body_and_header_floods_are_refused(gateway: Gateway) -> None:
    url = f"{gateway.url}/v1/chat/completions"
    big = b"x" * (8 * 1024 * 1024 + 1)
    declared = httpx.post(url, content=big, headers={"content-type": "application/json"})
    assert_openai_error(declared, 413, None)

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(9):
            yield b" " * (1024 * 1024)

    streamed = httpx.post(url, content=chunks(), headers={"content-type": "application/json"})
    assert_openai_error(streamed, 413, None)
    flood = {f"x-h{i}": "v" for i in range(150)}
    assert_openai_error(httpx.get(f"{gateway.url}/v1/models", headers=flood), 431, None)
    # The gateway is fine afterwards.
    assert httpx.get(f"{gateway.url}/v1/models").status_code == 200
