"""``/v1/responses`` (issue 33, item 6): OpenAI's Responses API, text in and out, created
whole and streamed, retrieved when stored, through the chat route's renderer, store and
feedback; one turn of an OpenAI Agents SDK agent without tools."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.conftest import Gateway

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)


def test_a_response_whole_and_streamed_is_the_same_answer(
    client: openai.OpenAI, gateway: Gateway
) -> None:
    whole = client.responses.create(
        model=gateway.model, input=QUESTION, temperature=0, max_output_tokens=32, store=False
    )
    assert whole.object == "response" and whole.id.startswith("resp_")
    assert whole.status == "completed"
    assert "Paris" in whole.output_text
    assert whole.usage is not None and whole.usage.output_tokens > 0
    assert whole.usage.total_tokens == whole.usage.input_tokens + whole.usage.output_tokens

    kinds: list[str] = []
    deltas: list[str] = []
    final = None
    with client.responses.create(
        model=gateway.model, input=QUESTION, temperature=0, max_output_tokens=32, stream=True
    ) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
            if event.type == "response.completed":
                final = event.response
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert final is not None and final.output_text == "".join(deltas) == whole.output_text


def test_instructions_and_a_conversation_render_as_chat_does(
    client: openai.OpenAI, gateway: Gateway
) -> None:
    conversation = [
        {"role": "user", "content": "Name a planet."},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Mars."}]},
        {"role": "user", "content": [{"type": "input_text", "text": "Another one?"}]},
    ]
    response = client.responses.create(
        model=gateway.model,
        instructions="Answer in one word.",
        input=conversation,  # type: ignore[arg-type]
        temperature=0,
        max_output_tokens=8,
        store=False,
    )
    chat = client.chat.completions.create(
        model=gateway.model,
        messages=[
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Name a planet."},
            {"role": "assistant", "content": "Mars."},
            {"role": "user", "content": "Another one?"},
        ],
        temperature=0,
        max_tokens=8,
    )
    assert response.output_text == chat.choices[0].message.content
    assert response.usage is not None and chat.usage is not None
    assert response.usage.input_tokens == chat.usage.prompt_tokens


def test_a_stored_response_is_retrieved_and_takes_feedback(
    client: openai.OpenAI, gateway: Gateway
) -> None:
    stored = client.responses.create(
        model=gateway.model,
        input=QUESTION,
        temperature=0,
        max_output_tokens=2,
        store=True,
        metadata={"run": "responses-test"},
    )
    assert stored.status == "incomplete"
    assert stored.incomplete_details is not None
    assert stored.incomplete_details.reason == "max_output_tokens"
    again = client.responses.retrieve(stored.id)
    assert again.id == stored.id and again.output_text == stored.output_text
    assert again.metadata == {"run": "responses-test"} and again.status == "incomplete"
    record = httpx.get(f"{gateway.url}/v1/completions/{stored.id}", timeout=10).json()
    assert record["endpoint"] == "responses"
    judged = httpx.post(
        f"{gateway.url}/v1/feedback",
        json={"completion_id": stored.id, "annotator": "test", "judgment": "Too short."},
        timeout=10,
    )
    assert judged.status_code in (200, 201), judged.text

    unstored = client.responses.create(
        model=gateway.model, input=QUESTION, max_output_tokens=2, store=False
    )
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    # A chat completion's id is not a response.
    chat = client.chat.completions.create(
        model=gateway.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, store=True
    )
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(chat.id)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"previous_response_id": "resp_x"}, "previous_response_id"),
        ({"text": {"format": {"type": "json_object"}}}, "text"),
        ({"n": 2}, "n"),
        ({"input": [{"role": "assistant", "content": "Hi"}]}, "input"),
    ],
)
def test_what_it_cannot_serve_is_a_400_naming_the_field(
    gateway: Gateway, extra: dict[str, object], param: str
) -> None:
    body = {"model": gateway.model, "input": QUESTION, **extra}
    refused = httpx.post(f"{gateway.url}/v1/responses", json=body, timeout=30)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"] == param


def test_one_agents_sdk_turn_without_tools(gateway: Gateway) -> None:
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, set_tracing_disabled

    set_tracing_disabled(True)  # nothing is sent to OpenAI's trace exporter
    model = OpenAIResponsesModel(
        model=gateway.model,
        openai_client=openai.AsyncOpenAI(
            base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0
        ),
    )
    agent = Agent(
        name="geographer",
        instructions="You answer questions about geography.",
        model=model,
        model_settings=ModelSettings(temperature=0, max_tokens=32),
    )
    result = asyncio.run(Runner.run(agent, QUESTION))
    assert isinstance(result.final_output, str) and "Paris" in result.final_output
