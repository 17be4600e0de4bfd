"""Tool calls on ``/v1/chat/completions``: whether a model can serve a request's tools,
how they shape the engine request, and the OpenAI shapes of the calls read back.

A model serves tools when its chat template reads ``tools`` (``Renderer.supports_tools``).
``tool_choice: auto`` (the default with tools) also needs the model's vLLM tool parser
switched on, as vLLM's ``--enable-auto-tool-choice --tool-call-parser``; ``required`` and a
named function constrain the answer to JSON instead (``engine.tool_parsing``).

Owns: those rules and their errors, the per-choice readers, the response and stream shapes
of calls, the assistant message a stored completion keeps. Does not know: templates,
vLLM's parsers (``engine.tool_parsing``), the rest of the chat response.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from server.engine.tool_parsing import (
    ParsedDelta,
    ParsedOutput,
    ToolCallReader,
    ToolRequest,
    forced_schema,
    mode_of,
)
from server.engine.types import StructuredSpec
from server.errors import InvalidRequest
from server.models.registry import ServedModel
from server.protocol import (
    AssistantMessage,
    ChatCompletionRequest,
    ChatDelta,
    FunctionCallDelta,
    FunctionCallOut,
    ToolCallDeltaOut,
    ToolCallOut,
)

AUTO_NEEDS = (
    '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set '
    "(in a models file: the model's `enable_auto_tool_choice` and `tool_call_parser`)"
)


@dataclass(frozen=True)
class ToolPlan:
    """A request's tools as this model serves them."""

    request: ToolRequest
    forced: dict[str, Any] | None  # the JSON Schema of required / named answers

    @property
    def tools(self) -> list[dict[str, Any]]:
        return self.request.tools

    @property
    def mode(self) -> str:
        return self.request.mode

    def reader(self) -> ToolCallReader:
        return ToolCallReader(self.request)

    def keeps_special_tokens(self) -> bool:
        """Whether the parser reads special tokens (its call markers may be ones)."""
        return self.mode == "auto" and self.reader().keeps_special_tokens()

    def structured(self, requested: StructuredSpec | None) -> StructuredSpec | None:
        """The answer's constraint: the forced call's schema, else the request's own."""
        if self.forced is None:
            return requested
        if requested is not None:
            raise InvalidRequest(
                f"tool_choice {self.mode} constrains the answer to a call's JSON: give no "
                "response_format or structured_outputs with it",
                param="tool_choice",
            )
        return StructuredSpec(json_schema=json.dumps(self.forced))

    def finish_reason(self, engine_reason: str | None, called: bool) -> str | None:
        """OpenAI's: ``tool_calls`` when auto or required calls were made (a named call
        keeps ``stop``)."""
        if called and (
            self.mode == "auto" or (self.mode == "required" and engine_reason == "stop")
        ):
            return "tool_calls"
        return engine_reason


def tool_plan(body: ChatCompletionRequest, model: ServedModel) -> ToolPlan | None:
    """How ``model`` serves ``body``'s tools; None without tools. A 400 for what it cannot."""
    if not body.tools:
        return None
    renderer = model.renderer
    if not renderer.supports_tools:
        what = (
            "its chat template never reads `tools`"
            if renderer.spec.uses_checkpoint_template
            else f"the {renderer.family} format is a fixed template without tools"
        )
        raise InvalidRequest(f"`tools` cannot be honoured by {model.name}: {what}.", param="tools")
    choice = body.effective_tool_choice()
    entry = model.entry
    if mode_of(choice) == "auto" and not (
        entry.enable_auto_tool_choice and entry.tool_call_parser is not None
    ):
        raise InvalidRequest(AUTO_NEEDS, param="tool_choice")
    tools = body.tool_list()
    try:
        forced = forced_schema(tools, choice, body.parallel_tool_calls)
    except ValueError as exc:  # vLLM's refusals of a tool's schema
        raise InvalidRequest(str(exc), param="tools") from exc
    request = ToolRequest(
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=body.parallel_tool_calls,
        parser_name=entry.tool_call_parser,
        tokenizer=renderer.tokenizer,
    )
    return ToolPlan(request, forced)


def assistant_message(parsed: ParsedOutput) -> AssistantMessage:
    return AssistantMessage(
        content=parsed.content,
        tool_calls=[
            ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments))
            for c in parsed.tool_calls
        ]
        or None,
    )


def delta_of(parsed: ParsedDelta) -> ChatDelta:
    return ChatDelta(
        content=parsed.content,
        tool_calls=[
            ToolCallDeltaOut(
                index=c.index,
                id=c.id,
                type="function" if c.id else None,
                function=FunctionCallDelta(name=c.name, arguments=c.arguments),
            )
            for c in parsed.tool_calls
        ]
        or None,
    )


@dataclass
class StreamedMessage:
    """One choice's message as streamed, put together again for the store."""

    content: str = ""
    calls: dict[int, dict[str, Any]] = field(default_factory=dict)

    def add(self, parsed: ParsedDelta) -> None:
        self.content += parsed.content or ""
        for c in parsed.tool_calls:
            call = self.calls.setdefault(
                c.index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
            )
            call["id"] = c.id or call["id"]
            call["function"]["name"] += c.name or ""
            call["function"]["arguments"] += c.arguments or ""

    def stored(self) -> dict[str, Any]:
        return stored_message(
            AssistantMessage(
                content=self.content or None,
                tool_calls=[ToolCallOut.model_validate(self.calls[i]) for i in sorted(self.calls)]
                or None,
            )
        )


def stored_message(message: AssistantMessage) -> dict[str, Any]:
    """What a stored completion keeps of an answer with tools (its text is the model's)."""
    return message.model_dump(exclude={"role"})
