"""Request ids, as vLLM's ``--enable-request-id-headers`` and most proxies treat them: a
client's (or a proxy's) ``x-request-id`` is kept when it is a plain token of at most 128
characters, else one is made; either way it is returned on the response, and it is readable
anywhere on the request's path (log records, stored records, spans) through a context
variable.

Owns: the id's rules and the ASGI middleware that sets it. Does not know: who reads it.
"""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "x-request-id"
# What a proxy or a client sends (UUIDs, hex, `req_…`, trace-style ids); anything else (too
# long, spaces, control characters) is replaced rather than copied into logs and rows.
_ACCEPTED = re.compile(r"^[A-Za-z0-9._:/@+=-]{1,128}$")

_current: ContextVar[str | None] = ContextVar("aligngate_request_id", default=None)


def current_request_id() -> str | None:
    """The id of the request being served here; None outside a request."""
    return _current.get()


def accepted(value: str | None) -> bool:
    return value is not None and _ACCEPTED.match(value) is not None


class RequestIdMiddleware:
    """Outermost: every response carries ``x-request-id``, refusals (401, 413, 503) too."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next(
            (v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), None
        )
        request_id = incoming if accepted(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        token = _current.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _current.reset(token)
