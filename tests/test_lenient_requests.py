"""Requests as lenient as vLLM's (issue 31, item 2), on the session's gateway: a field the
gateway does not take is ignored, logged once per name and named in
``x-aligngate-ignored-fields``; one that would change the answer and that the gateway
cannot honour is a 400 naming it. Before, every unknown field was a 400, and clients that
send fields of their own by default failed. Real clients: the OpenAI SDK and
``langchain-openai``."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import Gateway

HEADER = "x-aligngate-ignored-fields"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_unknown_fields_are_ignored_and_named(gateway: Gateway) -> None:
    extra = {"service_tier": "auto", "prompt_cache_key": "k1", "trust_remote_code": True}
    r = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": gateway.model, "messages": FRANCE, "max_tokens": 4, **extra},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert r.headers[HEADER] == "prompt_cache_key,service_tier,trust_remote_code"
    with httpx.stream(
        "POST",
        f"{gateway.url}/v1/completions",
        json={"model": gateway.model, "prompt": "Hi", "max_tokens": 2, "stream": True, "x": 1},
        timeout=120,
    ) as streamed:
        assert streamed.status_code == 200 and streamed.headers[HEADER] == "x"
        assert [line for line in streamed.iter_lines() if line][-1] == "data: [DONE]"
    # A field name is any JSON string; the header percent-encodes it (found by the fuzzer:
    # a raw name with a control character made uvicorn drop the connection).
    odd = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": gateway.model, "messages": FRANCE, "max_tokens": 2, "a b\n\u00e9": 1},
        timeout=120,
    )
    assert odd.status_code == 200 and odd.headers[HEADER] == "a%20b%0A%C3%A9"
    plain = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": gateway.model, "messages": FRANCE, "max_tokens": 2},
        timeout=120,
    )
    assert HEADER not in plain.headers
    log = gateway.log_path.read_text(errors="replace")
    assert log.count("Ignoring field 'service_tier'") == 1  # once per name
    r = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": gateway.model, "messages": FRANCE, "max_tokens": 2, "service_tier": "x"},
        timeout=120,
    )
    assert r.status_code == 200
    assert gateway.log_path.read_text(errors="replace").count("Ignoring field 'service_tier'") == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("functions", [{"name": "f", "parameters": {}}]),  # OpenAI's deprecated ones
        ("function_call", {"name": "f"}),
        ("suffix", "and so on"),
        ("best_of", 2),
        ("bad_words", ["sea"]),
        ("guided_json", {"type": "object"}),
    ],
)
def test_fields_that_would_change_the_answer_are_refused(
    gateway: Gateway, field: str, value: object
) -> None:
    r = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": gateway.model, "messages": FRANCE, "max_tokens": 2, field: value},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and "cannot be honoured" in error["message"], error
    # Their "off" values change nothing and pass.
    off = {"functions": [], "function_call": "none", "suffix": "", "best_of": 1}
    if field in off:
        r = httpx.post(
            f"{gateway.url}/v1/chat/completions",
            json={"model": gateway.model, "messages": FRANCE, "max_tokens": 2, field: off[field]},
            timeout=60,
        )
        assert r.status_code == 200, r.text


def test_the_openai_sdk_with_extra_body(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=gateway.model,
        messages=FRANCE,  # type: ignore[arg-type]
        max_tokens=8,
        temperature=0,
        extra_body={"vendor_option": {"a": 1}},
    )
    assert raw.headers[HEADER] == "vendor_option"
    reply = raw.parse()
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0  # type: ignore[union-attr]


def test_langchain_openai_chat_model(gateway: Gateway) -> None:
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(
        model=gateway.model,
        base_url=f"{gateway.url}/v1",
        api_key="unused",  # type: ignore[arg-type]
        temperature=0,
        max_tokens=8,  # type: ignore[call-arg]
        max_retries=0,
    )
    answer = chat.invoke("What is the capital of France?")
    chunks = chat.stream("What is the capital of France?")
    streamed = "".join(str(chunk.content) for chunk in chunks)
    assert answer.content and streamed == answer.content  # greedy: the same answer either way
