"""The OpenAI-compatible API, driven by the official `openai` client against the live
gateway (real vLLM, real SmolLM2-135M-Instruct)."""

from __future__ import annotations

import json
import math
import re

import httpx
import openai
import pytest

from tests.conftest import Gateway

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)


def test_greedy_answer_names_paris(client: openai.OpenAI, gateway: Gateway) -> None:
    reply = client.chat.completions.create(
        model=gateway.model, messages=FRANCE, temperature=0, max_tokens=32
    )
    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-")
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.role == "assistant"


def test_stream_concatenates_to_the_same_text(client: openai.OpenAI, gateway: Gateway) -> None:
    kwargs = dict(
        model=gateway.model,
        messages=[{"role": "user", "content": "Write a short poem about the sea."}],
        temperature=0.9,
        seed=1234,
        max_tokens=48,
    )
    whole = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    # include_usage: a last chunk with no choices carries the totals.
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_raw_sse_ends_with_done(gateway: Gateway) -> None:
    with httpx.stream(
        "POST",
        f"{gateway.url}/v1/chat/completions",
        json={"model": gateway.model, "messages": FRANCE, "max_tokens": 4, "stream": True},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_n_returns_that_many_choices(client: openai.OpenAI, gateway: Gateway) -> None:
    reply = client.chat.completions.create(
        model=gateway.model, messages=FRANCE, n=2, temperature=1.0, max_tokens=16
    )
    assert sorted(c.index for c in reply.choices) == [0, 1]
    assert all(c.message.content for c in reply.choices)


def test_stream_with_n_covers_every_choice(client: openai.OpenAI, gateway: Gateway) -> None:
    stream = client.chat.completions.create(
        model=gateway.model, messages=FRANCE, n=3, max_tokens=8, stream=True
    )
    finished = [choice.index for c in stream for choice in c.choices if choice.finish_reason]
    assert sorted(finished) == [0, 1, 2]


def test_stop_string_ends_the_answer(client: openai.OpenAI, gateway: Gateway) -> None:
    reply = client.chat.completions.create(
        model=gateway.model, messages=FRANCE, temperature=0, max_tokens=32, stop=["Paris"]
    )
    choice = reply.choices[0]
    assert "Paris" not in choice.message.content
    assert choice.message.content.startswith("The capital of France is")
    assert choice.finish_reason == "stop"


def test_length_finish_and_usage_match_the_tokenizer(
    client: openai.OpenAI, gateway: Gateway, tokenizer
) -> None:  # type: ignore[no-untyped-def]
    story = [{"role": "user", "content": "Tell me a long story about a dragon."}]
    reply = client.chat.completions.create(
        model=gateway.model, messages=story, temperature=0, max_tokens=12
    )
    expected_prompt = tokenizer.apply_chat_template(
        story, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == len(expected_prompt)
    assert reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == len(expected_prompt) + 12


def test_chat_logprobs_are_finite(client: openai.OpenAI, gateway: Gateway) -> None:
    reply = client.chat.completions.create(
        model=gateway.model,
        messages=FRANCE,
        temperature=0,
        max_tokens=8,
        logprobs=True,
        top_logprobs=3,
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for item in content:
        assert math.isfinite(item.logprob) and item.logprob <= 0
        assert len(item.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-4)


def test_completions_take_several_prompts_and_token_ids(
    client: openai.OpenAI, gateway: Gateway, tokenizer
) -> None:  # type: ignore[no-untyped-def]
    reply = client.completions.create(
        model=gateway.model,
        prompt=["The capital of France is", "1, 2, 3, 4,"],
        max_tokens=6,
        temperature=0,
        logprobs=2,
    )
    assert reply.object == "text_completion"
    assert [c.index for c in reply.choices] == [0, 1]
    assert "Paris" in reply.choices[0].text
    assert len(reply.choices[1].logprobs.tokens) == 6
    assert reply.usage.prompt_tokens == sum(
        len(tokenizer(p)["input_ids"]) for p in ["The capital of France is", "1, 2, 3, 4,"]
    )
    ids = tokenizer("The capital of France is")["input_ids"]
    by_ids = client.completions.create(
        model=gateway.model, prompt=ids, max_tokens=6, temperature=0, echo=True
    )
    assert by_ids.choices[0].text == "The capital of France is" + reply.choices[0].text


def test_completions_stream(client: openai.OpenAI, gateway: Gateway) -> None:
    whole = client.completions.create(
        model=gateway.model, prompt="Once upon a time", max_tokens=10, temperature=0
    )
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=gateway.model,
            prompt="Once upon a time",
            max_tokens=10,
            temperature=0,
            stream=True,
        )
        if c.choices
    )
    assert streamed == whole.choices[0].text


def test_models_lists_the_default_model(client: openai.OpenAI, gateway: Gateway) -> None:
    # adapters other tests loaded are listed too, each with its base as `parent`, and the
    # promotion aliases (`NAME@latest`), each naming the version it serves as `alias_of`
    models = [
        m
        for m in client.models.list().data
        if m.model_dump().get("parent") is None and m.model_dump().get("alias_of") is None
    ]
    assert [m.id for m in models] == [gateway.model]
    card = models[0].model_dump()
    assert card["owned_by"] == "aligngate"
    assert card["family"] == "chat"
    assert card["template"] == "checkpoint-chat-template"
    assert card["max_model_len"] == 8192
    assert client.models.retrieve(gateway.model).id == gateway.model


def test_structured_outputs_constrain_the_text(client: openai.OpenAI, gateway: Gateway) -> None:
    """vLLM's ``structured_outputs`` (regex, choice, json) and OpenAI's ``response_format``
    reach the engine; a spec the engine refuses is a 400, never a 500."""
    ask = {"model": gateway.model, "temperature": 0, "max_tokens": 48}
    question = [{"role": "user", "content": "Is Paris the capital of France?"}]
    choice = client.chat.completions.create(
        messages=question, extra_body={"structured_outputs": {"choice": ["yes", "no"]}}, **ask
    )
    assert choice.choices[0].message.content in ("yes", "no")
    digits = client.chat.completions.create(
        messages=[{"role": "user", "content": "Pick a number."}],
        extra_body={"structured_outputs": {"regex": "[0-9]{3}"}},
        **ask,
    )
    assert re.fullmatch("[0-9]{3}", digits.choices[0].message.content or "")
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
        "additionalProperties": False,
    }
    structured = client.chat.completions.create(
        messages=[{"role": "user", "content": "Name the capital of France as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
        **ask,
    )
    assert isinstance(json.loads(structured.choices[0].message.content or "")["city"], str)
    text = client.completions.create(
        prompt="The capital of France is",
        extra_body={"structured_outputs": {"choice": [" Paris", " Lyon"]}},
        **ask,
    )
    assert text.choices[0].text in (" Paris", " Lyon")
    for extra in (
        {"structured_outputs": {"regex": "("}},
        {"structured_outputs": {"regex": "a", "choice": ["b"]}},
        {"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}},
    ):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(messages=question, extra_body=extra, **ask)
