"""OpenTelemetry traces, optional, as vLLM's ``--otlp-traces-endpoint``: one span per HTTP
request (continuing a client's W3C ``traceparent``), and inside it ``render``, ``engine``,
``store`` and ``judge`` spans. The engines get the same endpoint, so vLLM's own
``llm_request`` span (queue time, time to first token, tokens) is the ``engine`` span's
child. Exported over OTLP as vLLM exports: gRPC by default,
``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf`` for OTLP over HTTP.

Without an endpoint the tracer is OpenTelemetry's no-op one: nothing is recorded or sent,
and the request middleware is not installed.

Owns: the tracer provider, the request-span middleware, span helpers and the trace headers
handed to vLLM. Does not know: what the spans time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

TRACER_NAME = "aligngate"
PROTOCOL_VARIABLE = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
_provider: Any = None


class TracingError(ValueError):
    """The trace export cannot be set up as configured (an OTLP protocol it does not speak)."""


def init_tracing(endpoint: str | None, service_name: str = "aligngate") -> bool:
    """Export this process's spans to ``endpoint``; False (and nothing set up) without one.
    One provider per process (OpenTelemetry's global cannot be replaced): a second call
    keeps the first."""
    global _provider
    if not endpoint or _provider is not None:
        return _provider is not None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(span_exporter(endpoint)))
    trace.set_tracer_provider(provider)
    _provider = provider
    return True


def shutdown_tracing() -> None:
    """Send what is buffered (the provider itself stops at the process's exit)."""
    if _provider is not None:
        _provider.force_flush()


def span_exporter(endpoint: str) -> Any:
    protocol = os.environ.get(PROTOCOL_VARIABLE, "grpc")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=endpoint, insecure=True)
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as OTLPHttpSpanExporter,
        )

        return OTLPHttpSpanExporter(endpoint=endpoint)
    raise TracingError(
        f"{PROTOCOL_VARIABLE}={protocol!r}: the gateway exports traces over grpc or "
        "http/protobuf, as vLLM does"
    )


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


@contextmanager
def span(name: str, **attributes: Any) -> Iterator[Span]:
    """A child of the current span (a request's, when serving one), current inside."""
    with tracer().start_as_current_span(name, attributes=_attributes(attributes)) as opened:
        yield opened


def start_span(name: str, **attributes: Any) -> Span:
    """A child of the current span that the caller ends (work that outlives the call)."""
    return tracer().start_span(name, attributes=_attributes(attributes))


def trace_headers(parent: Span) -> dict[str, str] | None:
    """W3C trace headers naming ``parent``, for vLLM's ``generate(trace_headers=...)``;
    None when nothing is recorded."""
    if not parent.is_recording():
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(parent))
    return carrier


def current_trace_headers() -> dict[str, str]:
    """W3C trace headers naming the current span (empty when nothing is recorded), for an
    HTTP call this span makes (a judge asking a model)."""
    carrier: dict[str, str] = {}
    if trace.get_current_span().is_recording():
        propagate.inject(carrier)
    return carrier


def end_span(opened: Span, error: BaseException | None = None) -> None:
    if error is not None:
        opened.record_exception(error)
        opened.set_status(Status(StatusCode.ERROR, type(error).__name__))
    opened.end()


def _attributes(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k.replace("__", "."): v for k, v in values.items() if v is not None}


class TracingMiddleware:
    """A SERVER span per HTTP request, named ``METHOD /route`` once the route is known;
    inside the request-id middleware, so the span carries ``aligngate.request_id``."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        method = scope["method"]
        state = scope.setdefault("state", {})
        with tracer().start_as_current_span(
            f"{method} {scope['path']}",
            context=propagate.extract(headers),
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": method,
                "url.path": scope["path"],
                "aligngate.request_id": state.get("request_id") or "",
            },
        ) as request_span:

            async def send_traced(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                    request_span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        request_span.set_status(Status(StatusCode.ERROR))
                await send(message)

            try:
                await self.app(scope, receive, send_traced)
            finally:
                route = getattr(scope.get("route"), "path", None)
                if route:
                    request_span.set_attribute("http.route", route)
                    request_span.update_name(f"{method} {route}")
                model = state.get("model")
                if model:
                    request_span.set_attribute("gen_ai.request.model", model)
