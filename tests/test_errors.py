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
        ("unknown_field", 1),
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
    assert_openai_error(httpx.get(f"{gateway.url}/v1/chat/completions", timeout=10), 405, None)
