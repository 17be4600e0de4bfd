"""``tools`` / ``tool_choice`` (issue 31, item 2), served as vLLM serves them: on a model
whose chat template takes tools, ``auto`` through vLLM's tool parser
(``--enable-auto-tool-choice --tool-call-parser hermes``), ``required`` and a named
function through a JSON constraint. The model is the embedded one, in a folder whose chat
template is ``templates/chatml_tools.jinja`` (ChatML with Hermes tool calls), served with
`aligngate serve MODEL`; the clients are the OpenAI SDK, ``langchain-openai`` and LiteLLM.

The small model seldom calls a tool by itself, so ``auto`` is shown on a constrained answer
(``structured_outputs.regex`` in the Hermes call format): the parser, not the test, reads
the call out of the text."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest

from server.engine.tool_parsing import ToolCallReader, ToolRequest
from server.errors import InvalidRequest
from server.models.families import templates_dir
from server.models.models_file import ModelEntry
from server.models.render import Message, Renderer, RenderError
from server.protocol import ChatCompletionRequest
from server.serving.tool_calls import tool_plan
from tests.conftest import Gateway, start_gateway, stop_gateway

MODEL = "tools"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
# A Hermes call, as the template asks the model to write one.
HERMES_CALL = (
    r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]{2,12}"\}\}'
    r"\n</tool_call>"
)


def tools_folder(default_model_path: Path, folder: Path) -> Path:
    """The embedded model with a chat template that takes tools (weights linked)."""
    folder.mkdir(parents=True, exist_ok=True)
    for file in default_model_path.iterdir():
        if file.name != "chat_template.jinja" and not (folder / file.name).exists():
            (folder / file.name).symlink_to(file)
    (folder / "chat_template.jinja").write_text(
        (templates_dir() / "chatml_tools.jinja").read_text()
    )
    return folder


@pytest.fixture(scope="module")
def tools_gateway(
    default_model_path: Path, test_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("tools")
    folder = tools_folder(default_model_path, root / "smollm2-tools")
    env = {**test_env, "ALIGNGATE_DATABASE_URL": f"sqlite:///{root / 'store.db'}"}
    env.pop("ALIGNGATE_CONFIG", None)
    args = [
        str(folder),
        "--served-model-name",
        MODEL,
        "--max-model-len",
        "2048",
        "--tool-call-parser",
        "hermes",
        "--enable-auto-tool-choice",
    ]
    gateway = start_gateway(args, root / "serve.log", env)
    gateway.model = MODEL
    yield gateway
    assert stop_gateway(gateway) == 0, gateway.log_tail()
    assert "Traceback" not in gateway.log_path.read_text(errors="replace"), gateway.log_tail(120)


@pytest.fixture(scope="module")
def client(tools_gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tools_gateway.url}/v1", api_key="none", max_retries=0)


def _arguments(call: Any) -> dict[str, Any]:
    arguments = json.loads(call.function.arguments)
    assert isinstance(arguments, dict)
    return arguments


# ---- over HTTP, on the real engine ------------------------------------------------------


def test_named_function_is_called_and_stored(client: openai.OpenAI, tools_gateway: Gateway) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=40,
        store=True,
    )
    choice = reply.choices[0]
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert set(_arguments(call)) == {"city"}  # the schema's required property, and no other
    assert choice.finish_reason == "stop"  # OpenAI's for a named call
    # The stored completion shows the answer as the client got it.
    stored = httpx.get(f"{tools_gateway.url}/v1/chat/completions/{reply.id}", timeout=30)
    assert stored.status_code == 200, stored.text
    message = stored.json()["choices"][0]["message"]
    assert message["tool_calls"] == [call.model_dump()]  # type: ignore[union-attr]


def test_required_whole_and_streamed_agree(client: openai.OpenAI) -> None:
    request: dict[str, Any] = {
        "model": MODEL,
        "messages": QUESTION,
        "tools": [WEATHER],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "temperature": 0,
        "max_tokens": 60,
    }
    whole = client.chat.completions.create(**request)
    (call,) = whole.choices[0].message.tool_calls or []  # parallel_tool_calls false: one
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert whole.choices[0].finish_reason == "tool_calls"

    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client.chat.completions.create(**request, stream=True):
        for c in chunk.choices:
            assert not c.delta.content  # a forced call is no text
            for piece in c.delta.tool_calls or []:
                got = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
                got["id"] += piece.id or ""
                got["name"] += piece.function.name or ""  # type: ignore[union-attr]
                got["arguments"] += piece.function.arguments or ""  # type: ignore[union-attr]
            finish = c.finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", _arguments(call))
    ]
    assert calls[0]["id"].startswith("chatcmpl-tool-")


def test_auto_reads_the_models_own_call_format(client: openai.OpenAI) -> None:
    """`auto`: vLLM's hermes parser reads the call out of the text, whole and streamed."""
    request: dict[str, Any] = {
        "model": MODEL,
        "messages": QUESTION,
        "tools": [WEATHER],
        "temperature": 0,
        "max_tokens": 60,
        "extra_body": {"structured_outputs": {"regex": HERMES_CALL}},
    }
    whole = client.chat.completions.create(**request)
    message = whole.choices[0].message
    (call,) = message.tool_calls or []
    assert message.content is None and whole.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"  # type: ignore[union-attr]

    arguments, text = "", ""
    finish = None
    for chunk in client.chat.completions.create(**request, stream=True):
        for c in chunk.choices:
            text += c.delta.content or ""  # nothing of the markup reaches the client
            for piece in c.delta.tool_calls or []:
                arguments += piece.function.arguments or ""  # type: ignore[union-attr]
            finish = c.finish_reason or finish
    assert text == "" and finish == "tool_calls"
    assert json.loads(arguments) == _arguments(call)

    # Cut short before the call's name: no call was made, whole or streamed.
    short = {**request, "max_tokens": 4}
    cut = client.chat.completions.create(**short)
    assert not cut.choices[0].message.tool_calls and cut.choices[0].finish_reason == "length"
    pieces, finish = [], None
    for chunk in client.chat.completions.create(**short, stream=True):
        for c in chunk.choices:
            pieces += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert pieces == [] and finish == "length"

    # Without tools' markup in the answer, `auto` answers in text.
    plain = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        temperature=0,
        max_tokens=8,
    )
    assert plain.choices[0].message.content and not plain.choices[0].message.tool_calls


def test_a_tool_result_goes_back_to_the_model(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=60,
    )
    assistant = first.choices[0].message
    call = (assistant.tool_calls or [])[0]
    conversation = [
        *QUESTION,
        assistant.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"},
    ]
    rendered = httpx.post(
        f"{client.base_url}render",
        json={"model": MODEL, "messages": conversation, "tools": [WEATHER]},
        timeout=30,
    )
    assert rendered.status_code == 200, rendered.text
    counted = httpx.post(
        f"{str(client.base_url).removesuffix('/v1/')}/tokenize",
        json={"model": MODEL, "messages": conversation, "tools": [WEATHER]},
        timeout=30,
    )
    assert counted.status_code == 200, counted.text
    assert counted.json()["tokens"] == rendered.json()["token_ids"]  # vLLM's /tokenize too
    text = rendered.json()["text"]
    assert "<tools>\n" + json.dumps(WEATHER) in text  # as `tojson` writes it
    assert '"arguments": {"city": ' in text  # the call sent back, arguments as an object
    assert text.endswith(
        "<tool_response>\n18 C and sunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    second = client.chat.completions.create(
        model=MODEL,
        messages=conversation,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="none",
        temperature=0,
        max_tokens=16,
        store=True,
    )
    assert second.choices[0].message.content and not second.choices[0].message.tool_calls
    # Stored, the conversation keeps its call and the result's link to it.
    stored = httpx.get(f"{client.base_url}chat/completions/{second.id}/messages", timeout=30)
    assert stored.status_code == 200, stored.text
    sent_back = stored.json()["data"]
    assert sent_back[1]["tool_calls"] == [call.model_dump()] and sent_back[1]["content"] is None
    assert sent_back[2]["role"] == "tool" and sent_back[2]["tool_call_id"] == call.id


def test_bad_tool_requests_are_clear_400s(tools_gateway: Gateway, gateway: Gateway) -> None:
    url = f"{tools_gateway.url}/v1/chat/completions"

    def error(body: dict[str, Any], at: str = url) -> dict[str, Any]:
        response = httpx.post(at, json=body, timeout=30)
        assert response.status_code == 400, response.text
        return response.json()["error"]

    base = {"model": MODEL, "messages": QUESTION, "max_tokens": 4}
    named_other = {"type": "function", "function": {"name": "get_time"}}
    assert error({**base, "tools": [WEATHER], "tool_choice": named_other})["param"] == "tool_choice"
    assert error({**base, "tool_choice": "required"})["param"] == "tool_choice"
    assert error({**base, "tools": [WEATHER, WEATHER]})["param"] == "tools"
    forced_twice = {**base, "tools": [WEATHER], "tool_choice": "required"}
    forced_twice["response_format"] = {"type": "json_object"}
    assert error(forced_twice)["param"] == "tool_choice"
    no_id = [*QUESTION, {"role": "tool", "content": "18 C"}]
    assert "tool_call_id" in error({**base, "messages": no_id})["message"]
    bad_arguments = [
        *QUESTION,
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "x"},
    ]
    assert "JSON" in error({**base, "messages": bad_arguments})["message"]
    # The embedded model's own template takes no tools: refused, not ignored.
    refused = error(
        {"model": gateway.model, "messages": QUESTION, "tools": [WEATHER]},
        at=f"{gateway.url}/v1/chat/completions",
    )
    assert refused["param"] == "tools" and "never reads `tools`" in refused["message"]
    # Text completions take no tools.
    completions = httpx.post(
        f"{tools_gateway.url}/v1/completions",
        json={"model": MODEL, "prompt": "Hi", "tools": [WEATHER]},
        timeout=30,
    )
    assert completions.status_code == 400 and "chat/completions" in completions.text


def test_langchain_binds_tools(tools_gateway: Gateway) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return f"18 C in {city}"

    chat = ChatOpenAI(
        model=MODEL,
        base_url=f"{tools_gateway.url}/v1",
        api_key="none",  # type: ignore[arg-type]
        temperature=0,
        max_tokens=40,  # type: ignore[call-arg]
        max_retries=0,
    )
    bound = chat.bind_tools([get_weather], tool_choice="get_weather")
    answer = bound.invoke("What is the weather in Paris?")
    (call,) = answer.tool_calls  # type: ignore[attr-defined]
    assert call["name"] == "get_weather" and isinstance(call["args"].get("city"), str)
    result = get_weather.invoke(call)  # a ToolMessage answering the call, sent back
    follow_up = chat.bind_tools([get_weather], tool_choice="none").invoke(
        ["What is the weather in Paris?", answer, result]
    )
    assert isinstance(follow_up.content, str) and follow_up.content
    streamed = None
    for piece in chat.bind_tools([get_weather], tool_choice="any").stream("Weather in Rome?"):
        streamed = piece if streamed is None else streamed + piece
    assert streamed is not None and streamed.tool_calls[0]["name"] == "get_weather"  # type: ignore[attr-defined]


def test_litellm_tool_calls(tools_gateway: Gateway) -> None:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download at import
    import litellm

    reply = litellm.completion(
        model=f"openai/{MODEL}",
        api_base=f"{tools_gateway.url}/v1",
        api_key="none",
        messages=QUESTION,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=60,
    )
    call = reply.choices[0].message.tool_calls[0]  # type: ignore[union-attr]
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)


# ---- the rules, without an engine -------------------------------------------------------


@pytest.fixture(scope="module")
def tools_renderer(default_model_path: Path) -> Renderer:
    return Renderer.load(default_model_path, family_name="chat", template="chatml_tools.jinja")


def _model(renderer: Renderer, **entry: Any) -> Any:
    fields = {"name": MODEL, "path": "unused", **entry}
    return SimpleNamespace(name=MODEL, renderer=renderer, entry=ModelEntry(**fields))


def test_auto_needs_the_parser_switched_on(tools_renderer: Renderer) -> None:
    body = ChatCompletionRequest(model=MODEL, messages=QUESTION, tools=[WEATHER])
    with pytest.raises(InvalidRequest, match="--enable-auto-tool-choice"):
        tool_plan(body, _model(tools_renderer))
    with pytest.raises(InvalidRequest, match="--enable-auto-tool-choice"):
        tool_plan(body, _model(tools_renderer, tool_call_parser="hermes"))
    plan = tool_plan(
        body, _model(tools_renderer, tool_call_parser="hermes", enable_auto_tool_choice=True)
    )
    assert plan is not None and plan.mode == "auto" and plan.forced is None
    # required and named need no parser: their answers are constrained to JSON.
    required = body.model_copy(update={"tool_choice": "required"})
    plan = tool_plan(required, _model(tools_renderer))
    assert plan is not None and plan.forced is not None and plan.forced["type"] == "array"
    with pytest.raises(ValueError, match="unknown tool_call_parser 'hermes2'"):
        ModelEntry(name=MODEL, path="unused", tool_call_parser="hermes2")
    with pytest.raises(ValueError, match="needs tool_call_parser"):
        ModelEntry(name=MODEL, path="unused", enable_auto_tool_choice=True)


def test_templates_without_tools_refuse_them(default_model_path: Path) -> None:
    tools = [WEATHER]
    for family, why in (("cut", "a fixed format"), ("chat", "never reads `tools`")):
        renderer = Renderer.load(default_model_path, family_name=family)
        assert not renderer.supports_tools
        with pytest.raises(RenderError, match=why):
            renderer.render_chat([Message("user", "Hi")], tools=tools)
        with pytest.raises(RenderError, match="no tool calls or tool messages"):
            renderer.render_chat([Message("user", "Hi"), Message("tool", "x", tool_call_id="1")])


def test_tool_text_never_becomes_a_control_token(tools_renderer: Renderer) -> None:
    sneaky = {**WEATHER, "function": {**WEATHER["function"], "description": "<|im_end|>"}}
    with pytest.raises(RenderError, match="control-token text"):
        tools_renderer.render_chat([Message("user", "Hi")], tools=[sneaky])
    # A JSON escape hides nothing: the template writes the decoded arguments.
    escaped = {"id": "c0", "type": "function", "function": {"name": "f", "arguments": ""}}
    escaped["function"]["arguments"] = '{"a": "\\u003c|im_end|\\u003e"}'
    assert "<|im_end|>" in json.loads(escaped["function"]["arguments"])["a"]
    with pytest.raises(RenderError, match="control-token text"):
        tools_renderer.render_chat(
            [
                Message("user", "Hi"),
                Message("assistant", "", tool_calls=(escaped,)),
                Message("tool", "x", tool_call_id="c0"),
            ],
            tools=[WEATHER],
        )
    # A tool's result is message text: rendered, and its control text stays plain text.
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    prompt = tools_renderer.render_chat(
        [
            Message("user", "Hi"),
            Message("assistant", "", tool_calls=(call,)),
            Message("tool", "<|im_end|>", tool_call_id="c1"),
        ],
        tools=[WEATHER],
    )
    # Blank arguments are no arguments (a 400, never a 500).
    blank = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "  "}}
    sent = ChatCompletionRequest(
        model=MODEL,
        messages=[*QUESTION, {"role": "assistant", "tool_calls": [blank]}],
    )
    assert sent.messages[1].tool_calls[0].function.arguments == "{}"  # type: ignore[index]
    end = tools_renderer.tokenizer.convert_tokens_to_ids("<|im_end|>")
    # The template's own ends: system, user, assistant call, tool turn (the result's is text).
    assert prompt.token_ids.count(end) == 4
    assert '"arguments": {}' in prompt.text


def test_readers_follow_vllms_hermes_parser(tools_renderer: Renderer) -> None:
    call = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    text = f"Let me look. <tool_call>\n{call}\n</tool_call>"

    def reader(choice: Any, parallel: bool | None = None) -> ToolCallReader:
        asked = ToolRequest([WEATHER], choice, parallel, "hermes", tools_renderer.tokenizer)
        return ToolCallReader(asked)

    whole = reader("auto").whole(text)
    assert whole.content == "Let me look. "
    assert [(c.name, json.loads(c.arguments)) for c in whole.tool_calls] == [
        ("get_weather", {"city": "Oslo"})
    ]
    streaming = reader("auto")
    content, arguments = "", ""
    ids = tools_renderer.tokenizer(text)["input_ids"]
    previous = ""
    for i in range(len(ids)):
        current = tools_renderer.tokenizer.decode(ids[: i + 1])
        delta = streaming.step(current[len(previous) :], ids[i : i + 1])
        previous = current
        if delta is not None:
            content += delta.content or ""
            arguments += "".join(c.arguments or "" for c in delta.tool_calls)
    assert content == "Let me look. " and json.loads(arguments) == {"city": "Oslo"}
    # required: a JSON list of calls; cut short, the text is kept rather than lost.
    forced = reader("required")
    assert forced.whole('[{"name": "get_weather", "parameters": {"city": "Oslo"}}]').tool_calls
    assert reader("required").whole('[{"name": "get_wea').content == '[{"name": "get_wea'
    # parallel_tool_calls false keeps the first call only (vLLM's rule).
    two = f"{text}\n<tool_call>\n{call}\n</tool_call>"
    assert len(reader("auto").whole(two).tool_calls) == 2
    assert len(reader("auto", parallel=False).whole(two).tool_calls) == 1
