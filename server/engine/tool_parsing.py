"""Tool calls read out of a model's text by vLLM's own tool parsers
(``--tool-call-parser hermes`` …), behind an interface without vLLM's types.

How a choice's calls are read depends on ``tool_choice``, as in vLLM's server:

- ``auto``: the model writes calls in its own format; the named vLLM parser finds them,
  whole (``extract_tool_calls``) or step by step while streaming
  (``extract_tool_calls_streaming``).
- ``required`` / a named function: the answer is constrained to JSON (``forced_schema``:
  vLLM's schema from the tools) and read back as calls: a list of ``{name, parameters}``,
  or the named function's arguments. No parser is needed.
- ``none``: text only.

Owns: the vLLM parser objects and request they expect, reading forced JSON back, and the
parser names. Does not know: HTTP shapes, templates, whether a family may take tools.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Mode = Literal["none", "auto", "required", "named"]


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI's ``function.arguments``


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A streamed piece of call ``index``: its id and name first, then its arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str | None = None


@dataclass(frozen=True, slots=True)
class ParsedOutput:
    content: str | None
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True, slots=True)
class ParsedDelta:
    content: str | None
    tool_calls: tuple[ToolCallDelta, ...] = ()


def parser_names() -> list[str]:
    """The tool parsers this vLLM has (``--tool-call-parser`` choices)."""
    from vllm.tool_parsers import ToolParserManager

    return sorted(ToolParserManager.list_registered())


def check_parser_name(name: str) -> None:
    names = parser_names()
    if name not in names:
        raise ValueError(f"unknown tool_call_parser {name!r}; vLLM has: {', '.join(names)}")


def mode_of(tool_choice: str | dict[str, Any]) -> Mode:
    if isinstance(tool_choice, dict):
        return "named"
    if tool_choice not in ("none", "auto", "required"):
        raise ValueError(f"tool_choice is none, auto, required or a function; got {tool_choice!r}")
    return tool_choice  # type: ignore[return-value]


def _vllm_request(
    tools: list[dict[str, Any]], tool_choice: str | dict[str, Any], parallel: bool | None
) -> Any:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return ChatCompletionRequest(
        model="aligngate",
        messages=[],
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=parallel,
    )


def forced_schema(
    tools: list[dict[str, Any]], tool_choice: str | dict[str, Any], parallel: bool | None
) -> dict[str, Any] | None:
    """The JSON Schema an answer must meet for ``required`` or a named function (vLLM's,
    from the tools' parameters); None for ``auto`` and ``none``."""
    if mode_of(tool_choice) not in ("required", "named"):
        return None
    from vllm.tool_parsers.utils import get_json_schema_from_tools

    request = _vllm_request(tools, tool_choice, parallel)
    schema = get_json_schema_from_tools(request.tool_choice, request.tools, parallel)
    if isinstance(schema, str):
        schema = json.loads(schema)
    return schema


def _new_id() -> str:
    from vllm.renderers.chat_utils import make_tool_call_id

    return str(make_tool_call_id())


def _forced_calls(text: str) -> list[tuple[str, str]] | None:
    """``required``'s answer as (name, arguments) pairs; None when it is not such a list
    (the answer was cut short)."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(items, list) or not all(
        isinstance(i, dict) and isinstance(i.get("name"), str) and "parameters" in i for i in items
    ):
        return None
    return [(i["name"], json.dumps(i["parameters"], ensure_ascii=False)) for i in items]


@dataclass(frozen=True)
class ToolRequest:
    """A request's tools (OpenAI's dicts), and what reads this model's calls."""

    tools: list[dict[str, Any]]
    tool_choice: str | dict[str, Any]
    parallel_tool_calls: bool | None
    parser_name: str | None  # the vLLM tool parser (``auto`` needs one)
    tokenizer: Any

    @property
    def mode(self) -> Mode:
        return mode_of(self.tool_choice)


@dataclass
class ToolCallReader:
    """One choice's tool calls (a parser keeps state: one reader per choice)."""

    request: ToolRequest
    mode: Mode = field(init=False)
    _request: Any = field(init=False, default=None)
    _parser: Any = field(init=False, default=None)
    # Streaming state: the text and ids so far; forced calls already sent.
    _text: str = field(init=False, default="")
    _ids: list[int] = field(init=False, default_factory=list)
    _sent_calls: int = field(init=False, default=0)
    _scan: int = field(init=False, default=0)
    # auto: the calls whose id and name went out (only their arguments may follow).
    _announced: set[int] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        asked = self.request
        self.mode = asked.mode
        if self.mode == "auto":
            if asked.parser_name is None:
                raise ValueError("tool_choice auto needs a tool parser")
            from vllm.tool_parsers import ToolParserManager

            self._request = _vllm_request(asked.tools, asked.tool_choice, asked.parallel_tool_calls)
            parser_class = ToolParserManager.get_tool_parser(asked.parser_name)
            self._parser = parser_class(asked.tokenizer, tools=self._request.tools)
            self._request = self._parser.adjust_request(self._request)

    @property
    def parallel_tool_calls(self) -> bool | None:
        return self.request.parallel_tool_calls

    @property
    def named(self) -> str | None:
        if isinstance(self.request.tool_choice, dict):
            return str(self.request.tool_choice["function"]["name"])
        return None

    def keeps_special_tokens(self) -> bool:
        """Whether the parser needs special tokens left in the text (its call markers may
        be special tokens)."""
        return self._request is not None and self._request.skip_special_tokens is False

    # ---- a whole answer -------------------------------------------------------------------

    def whole(self, text: str) -> ParsedOutput:
        if self.mode == "none":
            return ParsedOutput(text)
        if self.mode == "named":
            if not text.strip():
                return ParsedOutput(None)
            return ParsedOutput(None, (ToolCall(_new_id(), self.named or "", text),))
        if self.mode == "required":
            calls = _forced_calls(text)
            if calls is None:  # cut short: the text is kept, not lost
                return ParsedOutput(text)
            return ParsedOutput(None, tuple(ToolCall(_new_id(), n, a) for n, a in calls))
        info = self._parser.extract_tool_calls(text, self._request)
        if not info.tools_called:
            return ParsedOutput(info.content)
        content = info.content if info.content and info.content.strip() else None
        calls = tuple(
            ToolCall(c.id or _new_id(), c.function.name, c.function.arguments)
            for c in info.tool_calls
        )
        # vLLM's rule for parallel_tool_calls false: the first call only.
        return ParsedOutput(content, calls[:1] if self.parallel_tool_calls is False else calls)

    # ---- streaming ------------------------------------------------------------------------

    def step(self, delta_text: str, delta_ids: Sequence[int]) -> ParsedDelta | None:
        """What a client is sent for the engine's next piece of text; None: nothing yet."""
        previous_text, previous_ids = self._text, list(self._ids)
        self._text += delta_text
        self._ids.extend(delta_ids)
        if self.mode == "none":
            return ParsedDelta(delta_text) if delta_text else None
        if self.mode == "named":
            if not delta_text:
                return None
            first = self._sent_calls == 0
            self._sent_calls = 1
            call = ToolCallDelta(
                0,
                id=_new_id() if first else None,
                name=self.named if first else None,
                arguments=delta_text,
            )
            return ParsedDelta(None, (call,))
        if self.mode == "required":
            calls = self._complete_forced_calls()
            return ParsedDelta(None, tuple(calls)) if calls else None
        delta = self._parser.extract_tool_calls_streaming(
            previous_text,
            self._text,
            delta_text,
            previous_ids,
            list(self._ids),
            list(delta_ids),
            self._request,
        )
        if delta is None:
            return None
        calls = tuple(
            ToolCallDelta(
                c.index,
                id=c.id,
                name=c.function.name if c.function else None,
                arguments=c.function.arguments if c.function else None,
            )
            for c in delta.tool_calls or []
            if c.index == 0 or self.parallel_tool_calls is not False
        )
        self._announced.update(c.index for c in calls if c.name)
        calls = tuple(c for c in calls if c.index in self._announced)
        if not delta.content and not calls:
            return None
        return ParsedDelta(delta.content or None, calls)

    def _complete_forced_calls(self) -> list[ToolCallDelta]:
        """``required``'s calls closed so far in the streamed JSON list, each sent whole."""
        text = self._text
        out: list[ToolCallDelta] = []
        if self._scan == 0:
            start = text.find("[")
            if start < 0:
                return out
            self._scan = start + 1
        decoder = json.JSONDecoder()
        while True:
            pos = self._scan
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text) or text[pos] == "]":
                return out
            try:
                item, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError:
                return out
            self._scan = end
            if isinstance(item, dict) and isinstance(item.get("name"), str):
                out.append(
                    ToolCallDelta(
                        self._sent_calls,
                        id=_new_id(),
                        name=item["name"],
                        arguments=json.dumps(item.get("parameters", {}), ensure_ascii=False),
                    )
                )
                self._sent_calls += 1

    def finish(self) -> ParsedDelta | None:
        """When the answer ends: arguments a parser read but had not streamed yet; or
        ``required``'s text when it never became a call (cut short: kept, not lost)."""
        if self.mode == "required" and self._sent_calls == 0 and self._text:
            return ParsedDelta(self._text)
        if self.mode != "auto" or not self._parser.prev_tool_call_arr:
            return None
        index = len(self._parser.prev_tool_call_arr) - 1
        if index not in self._announced:  # cut short before its name: no call was made
            return None
        remaining = self._parser.get_remaining_unstreamed_args()
        if not remaining:
            return None
        return ParsedDelta(None, (ToolCallDelta(index, arguments=remaining),))

    def streamed_calls(self) -> bool:
        """Whether any call went out while streaming."""
        if self.mode == "auto":
            return bool(self._announced)
        return self._sent_calls > 0
