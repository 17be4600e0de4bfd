"""Logs and traces (issue 31, item 4) on a gateway started as a vLLM user starts one
(``serve MODEL ... --log-format json --otlp-traces-endpoint URL``, tests/conftest.py):

- ``x-request-id`` is kept when sane, made when absent or not, returned on every response
  (refusals too), and put in log lines and stored records (completions and feedback);
- ``--log-format json``: every line the gateway writes, vLLM's engine processes' included,
  is one JSON object; the lines logged for a request carry its id;
- OpenTelemetry traces reach an OTLP collector: a client's ``traceparent`` is continued by
  the request's span, with ``render``, ``engine`` and ``store`` inside it and vLLM's own
  ``llm_request`` span under ``engine``; a judge's call is a ``judge`` span.
"""

from __future__ import annotations

import json
import re
import secrets
import time

import httpx
import pytest
import sqlalchemy

from tests.conftest import SERVED_FOLDER_KEY, Gateway
from tests.otlp_collector import Collector

AUTH = {"authorization": f"Bearer {SERVED_FOLDER_KEY}"}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _chat(gateway: Gateway, headers: dict[str, str], **extra: object) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": "tiny", "messages": QUESTION, "max_tokens": 4, **extra},
        headers={**AUTH, **headers},
        timeout=120,
    )


def test_request_ids_are_kept_made_returned_and_stored(served_folder: Gateway) -> None:
    answer = _chat(served_folder, {"x-request-id": "client-req-0001"}, store=True)
    assert answer.status_code == 200 and answer.headers["x-request-id"] == "client-req-0001"
    made = _chat(served_folder, {})
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["x-request-id"])
    for unfit in ("has spaces in it", "x" * 129):
        replaced = _chat(served_folder, {"x-request-id": unfit})
        assert re.fullmatch(r"[0-9a-f]{32}", replaced.headers["x-request-id"])
    refused = httpx.get(f"{served_folder.url}/v1/models", headers={"x-request-id": "nokey-1"})
    assert refused.status_code == 401 and refused.headers["x-request-id"] == "nokey-1"

    completion_id = answer.json()["id"]
    stored = httpx.get(f"{served_folder.url}/v1/completions/{completion_id}", headers=AUTH)
    assert stored.status_code == 200 and stored.json()["request_id"] == "client-req-0001"
    feedback = httpx.post(
        f"{served_folder.url}/v1/feedback",
        json={"completion_id": completion_id, "rating": 1, "rating_scale": "thumbs"},
        headers={**AUTH, "x-request-id": "client-feedback-0001"},
    )
    assert feedback.status_code == 201, feedback.text
    url = served_folder.log_path.parent / "store.db"
    deadline = time.monotonic() + 30
    engine = sqlalchemy.create_engine(f"sqlite:///{url}")
    try:
        while True:
            with engine.connect() as conn:
                row = conn.execute(
                    sqlalchemy.text("SELECT request_id FROM feedback WHERE completion_id = :c"),
                    {"c": completion_id},
                ).first()
            if row is not None or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        engine.dispose()
    assert row is not None and row[0] == "client-feedback-0001"


def test_json_logs_parse_and_carry_the_request_id(served_folder: Gateway) -> None:
    request_id = f"json-log-{secrets.token_hex(4)}"
    # An unknown field: the lenient rule's warning is logged while serving this request.
    answer = _chat(served_folder, {"x-request-id": request_id}, vendor_field=1)
    assert answer.status_code == 200
    deadline = time.monotonic() + 10
    while True:
        lines = served_folder.log_path.read_text(errors="replace").splitlines()
        records = []
        for line in lines:
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pytest.fail(f"not a JSON line: {line!r}")
        mine = [r for r in records if r.get("request_id") == request_id]
        if len(mine) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    loggers = {r["logger"] for r in mine}
    assert "uvicorn.access" in loggers, mine  # the access line
    assert any("vendor_field" in r["message"] for r in mine), mine
    # vLLM's own loggers, the engine's process included, write JSON lines too.
    assert any(r["logger"].startswith("vllm") for r in records)


def test_traces_continue_the_clients_and_reach_into_vllm(
    served_folder: Gateway, otlp_collector: Collector
) -> None:
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    answer = _chat(
        served_folder,
        {"traceparent": f"00-{trace_id}-{parent}-01", "x-request-id": "traced-0001"},
        store=True,
    )
    assert answer.status_code == 200
    wanted = {"POST /v1/chat/completions", "render", "engine", "store", "llm_request"}
    spans = otlp_collector.of_trace(trace_id, wanted)
    by_name = {s.name: s for s in spans}
    assert wanted <= by_name.keys(), sorted(by_name)
    request = by_name["POST /v1/chat/completions"]
    assert request.parent_span_id == parent  # the client's span goes on
    assert request.attributes["aligngate.request_id"] == "traced-0001"
    assert request.attributes["http.response.status_code"] == 200
    assert request.attributes["gen_ai.request.model"] == "tiny"
    for child in ("render", "engine", "store"):
        assert by_name[child].parent_span_id == request.span_id, child
    engine = by_name["engine"]
    assert engine.attributes["aligngate.outcome"] == "ok"
    assert by_name["llm_request"].parent_span_id == engine.span_id  # vLLM's own span
    assert by_name["llm_request"].attributes["gen_ai.request.max_tokens"] == 4


async def test_a_judge_call_is_a_span() -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from server.evaluation.judges import build_judge, judge_one
    from server.models.models_file import JudgeEntry
    from server.telemetry.tracing import span

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # this test process's only provider
    judge = build_judge(
        JudgeEntry(name="words", kind="function", target="tests.function_judges:words")
    )
    with span("outer"):
        await judge_one(judge, QUESTION, "Paris.")
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans["judge"].attributes["aligngate.judge"] == "words"
    assert spans["judge"].parent.span_id == spans["outer"].context.span_id


def test_an_unhandled_error_keeps_its_request_id(caplog: pytest.LogCaptureFixture) -> None:
    """Starlette answers an unhandled exception outside every added middleware: the 500
    and its log line still carry the request's id."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from server.errors import install_error_handlers
    from server.telemetry.request_ids import RequestIdMiddleware

    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.get("/boom", headers={"x-request-id": "crash-0001"})
    assert answer.status_code == 500 and answer.headers["x-request-id"] == "crash-0001"
    assert answer.json()["error"]["type"] == "server_error"
    (logged,) = [r for r in caplog.records if r.getMessage() == "Unhandled error"]
    assert logged.request_id == "crash-0001"  # type: ignore[attr-defined]


JSON_STDERR_SCRIPT = r"""
import os, subprocess, sys
from server.telemetry.logs import configure_logging
import logging
configure_logging("info", "json")
logging.getLogger("x").info("from a logger")
os.write(2, b"raw bytes from C\n")
os.write(2, b"[" * 5000 + b"\n")  # nests past the recursion limit if parsed
os.write(2, b'{"already": "json"}\n')
subprocess.run([sys.executable, "-c", "import sys; print('from a child', file=sys.stderr)"])
logging.getLogger("x").info("after all that")
"""


def test_json_stderr_wraps_every_line_and_keeps_going() -> None:
    import subprocess
    import sys

    from tests.conftest import REPO

    done = subprocess.run(
        [sys.executable, "-c", JSON_STDERR_SCRIPT],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    messages = [r.get("message") for r in records]
    assert messages[0] == "from a logger" and messages[-1] == "after all that"
    assert "raw bytes from C" in messages and "from a child" in messages
    assert {"already": "json"} in records
    assert any(m and m.startswith("[[[[") for m in messages)


def test_an_otlp_protocol_the_gateway_cannot_speak_is_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from server.telemetry.tracing import TracingError, span_exporter

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json")
    with pytest.raises(TracingError, match="'http/json': the gateway exports traces over grpc"):
        span_exporter("http://127.0.0.1:4318/v1/traces")
