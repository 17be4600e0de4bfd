"""Limits on what a request may bring before any route sees it: the body's size (413) and
the headers' number and size (431). Field-level limits (n, logprobs, messages, …) are in
``protocol``.

Owns: the ASGI middleware. Does not know: routes.
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_body

MAX_HEADERS = 100
MAX_HEADER_BYTES = 32 * 1024


class RequestLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers", [])
        if len(headers) > MAX_HEADERS or sum(len(k) + len(v) for k, v in headers) > (
            MAX_HEADER_BYTES
        ):
            await _refuse(
                send,
                431,
                f"Too many or too large request headers (at most {MAX_HEADERS} headers, "
                f"{MAX_HEADER_BYTES} bytes).",
            )
            return
        for name, value in headers:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _refuse(send, 400, "Invalid Content-Length header.")
                    return
                if declared > self.max_body_bytes:
                    await _refuse(send, 413, self._too_large())
                    return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    # Handled by the app's error handlers: an OpenAI error object.
                    raise HTTPException(413, self._too_large())
            return message

        await self.app(scope, counting_receive, send)

    def _too_large(self) -> str:
        return f"The request body is larger than {self.max_body_bytes} bytes."


async def _refuse(send: Send, status: int, message: str) -> None:
    body = json.dumps(error_body(message, "invalid_request_error")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
