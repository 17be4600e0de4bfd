"""Fields a client sends that the gateway does not take, handled as vLLM's server handles
them: ignored, logged once per field name, and named in a response header — except those
that would change the answer and that the gateway cannot honour, which are a 400 naming
the field (answering without them would be answering a different request).

Clients send such fields by default (LangChain, LiteLLM, newer OpenAI SDKs:
``service_tier``, ``stream_options`` on a non-streamed request …).

Owns: which fields are refused and why, the once-per-name log, the header. Does not know:
what the request asks otherwise (``protocol``), engines.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import InvalidRequest

log = logging.getLogger(__name__)

IGNORED_FIELDS_HEADER = "x-aligngate-ignored-fields"
STATE_KEY = "ignored_fields"
# A request may name thousands of fields (within the body limit): the header names the
# first ones, and the log stops learning new names after this many.
MAX_NAMED = 32
MAX_LOGGED_NAMES = 1024


def _given(value: Any) -> bool:
    return value not in (None, False, "", [], {}, 0)


def _not_none(choice: Any) -> bool:
    return choice not in (None, "none", "auto")


# Field -> (when its value changes the answer, why the gateway cannot honour it).
_CANNOT_HONOUR: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tools": (_given, "tool calls are served on /v1/chat/completions only"),
    "tool_choice": (_not_none, "tool calls are served on /v1/chat/completions only"),
    "functions": (_given, "OpenAI's deprecated functions: send `tools` instead"),
    "function_call": (_not_none, "OpenAI's deprecated function_call: send `tool_choice`"),
    "logprob_token_ids": (_given, "logprob_token_ids is not supported"),
    "suffix": (_given, "insertion (suffix) is not supported"),
    "best_of": (lambda v: v not in (None, 1), "best_of is not supported (vLLM V1 removed it)"),
    "use_beam_search": (_given, "beam search is not supported"),
    "length_penalty": (lambda v: v not in (None, 1, 1.0), "beam search is not supported"),
    "spaces_between_special_tokens": (lambda v: v is False, "special tokens are skipped"),
    "add_special_tokens": (_given, "the family's template decides special tokens"),
    "echo": (_given, "echo is not supported on chat completions"),
    "allowed_token_ids": (_given, "allowed_token_ids is not supported"),
    "bad_words": (_given, "bad_words is not supported"),
    "truncate_prompt_tokens": (_given, "prompts are never truncated: a long one is a 400"),
    "return_tokens_as_token_ids": (_given, "return_tokens_as_token_ids is not supported"),
    "guided_json": (_given, "use structured_outputs or response_format"),
    "guided_regex": (_given, "use structured_outputs or response_format"),
    "guided_choice": (_given, "use structured_outputs or response_format"),
    "guided_grammar": (_given, "grammars are not supported; use structured_outputs"),
    "modalities": (lambda v: v not in (None, ["text"]), "text is the only modality"),
    "audio": (_given, "audio output is not supported"),
    "web_search_options": (_given, "hosted tools are not supported"),
}

_logged: set[str] = set()


def cannot_honour(name: str) -> str | None:
    """Why a field the gateway does not take is refused when given, or None (ignored)."""
    refused = _CANNOT_HONOUR.get(name)
    return refused[1] if refused is not None else None


def ignored_fields(extra: Mapping[str, Any] | None, endpoint: str) -> list[str]:
    """The names of ``extra`` (a request's fields the gateway does not take) it ignores;
    a 400 for the first whose value would change the answer."""
    names = sorted(extra or {})
    for name in names:
        refused = _CANNOT_HONOUR.get(name)
        if refused is not None and refused[0](extra[name]):  # type: ignore[index]
            raise InvalidRequest(f"`{name}` cannot be honoured: {refused[1]}.", param=name)
    for name in names:
        if name not in _logged and len(_logged) < MAX_LOGGED_NAMES:
            _logged.add(name)
            log.warning("Ignoring field %r sent to %s (logged once per field name)", name, endpoint)
    return names


def header_value(names: list[str]) -> bytes:
    """The header's value: the names percent-encoded (a field name is any JSON string, a
    header value visible ASCII), at most ``MAX_NAMED`` of them, then how many more."""
    shown = [quote(n.encode("utf-8", "surrogatepass"), safe="") for n in names[:MAX_NAMED]]
    if len(names) > MAX_NAMED:
        shown.append(f"...{len(names) - MAX_NAMED} more")
    return ",".join(shown).encode("ascii")


def note_ignored(scope: Scope, names: list[str]) -> None:
    """Name ``names`` in this request's response header (``IgnoredFieldsHeader``)."""
    if names:
        scope.setdefault("state", {})[STATE_KEY] = names


class IgnoredFieldsHeader:
    """Adds ``x-aligngate-ignored-fields`` to a response whose request noted some."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = scope.get("state", {}).get(STATE_KEY)
                if names:
                    headers = list(message.get("headers", []))
                    headers.append((IGNORED_FIELDS_HEADER.encode(), header_value(names)))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_header)
