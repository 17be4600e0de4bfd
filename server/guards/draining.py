"""Graceful shutdown: on SIGTERM the gateway drains before it stops.

While draining, every new request (``/health`` included, so balancers look elsewhere) gets
503 with ``Retry-After`` and ``Connection: close``; requests already running go on. When none
is left, or the drain timeout passes, uvicorn's own shutdown runs: connections close, the
lifespan stops the engines and flushes the store.

Owns: the drain flag and the count of requests in progress. Does not know: routes, engines.
"""

from __future__ import annotations

import json
import time

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import error_body


class Drain:
    def __init__(self) -> None:
        self.since: float | None = None
        self.in_flight = 0

    @property
    def draining(self) -> bool:
        return self.since is not None

    def start(self) -> None:
        if self.since is None:
            self.since = time.monotonic()

    def done(self, timeout_s: float) -> bool:
        """Draining, and nothing left to wait for (or waited long enough)."""
        if self.since is None:
            return False
        return self.in_flight == 0 or time.monotonic() - self.since >= timeout_s


class DrainMiddleware:
    def __init__(self, app: ASGIApp, drain: Drain):
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            body = json.dumps(
                error_body(
                    "The gateway is shutting down; retry shortly (or on another instance).",
                    "server_error",
                    None,
                    "shutting_down",
                )
            ).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"5"),
                (b"connection", b"close"),
            ]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1
