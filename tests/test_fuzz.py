"""Fuzzing: schemathesis generates requests from the gateway's own OpenAPI schema — valid
ones (positive) and invalid ones (negative) — for every route, admin routes included, against
a live gateway with keys configured. No answer may be a 5xx; every error must be an OpenAI
error object. Half of the generated bodies name the real model, so valid ones reach vLLM."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from server.models.default_model import DEFAULT_MODEL_NAME
from tests.conftest import Gateway, start_own_gateway, stop_gateway

ADMIN = "fuzz-admin-0123456789abcdef"
USER = "fuzz-user-0123456789abcdef"
EXAMPLES = {GenerationMode.POSITIVE: 150, GenerationMode.NEGATIVE: 150}
MAX_GENERATED_TOKENS = 8  # valid requests that reach the engine stay short

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fuzz_gateway(
    test_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    folder = tmp_path_factory.mktemp("fuzz")
    gw = start_own_gateway(
        folder,
        "models:\n"
        f"  - {{name: {DEFAULT_MODEL_NAME}, path: 'builtin:{DEFAULT_MODEL_NAME}', store: true, "
        "max_model_len: 512, lora: {}}\n",
        test_env,
        {
            "ALIGNGATE_API_KEYS": USER,
            "ALIGNGATE_ADMIN_KEY": ADMIN,
            "ALIGNGATE_ADAPTERS_DIR": str(folder / "adapters"),
        },
    )
    yield gw
    assert stop_gateway(gw) == 0, gw.log_tail()


def aim_at_the_model(case: Any, use_model: bool) -> Any:
    """Point a generated body at the served model and keep its generation short."""
    body = case.body
    if use_model and isinstance(body, dict) and "model" in body:
        body["model"] = DEFAULT_MODEL_NAME
        for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            if isinstance(body.get(field), int) and body[field] > MAX_GENERATED_TOKENS:
                body[field] = MAX_GENERATED_TOKENS
        if isinstance(body.get("min_tokens"), int):
            body["min_tokens"] = min(body["min_tokens"], MAX_GENERATED_TOKENS)
        if "max_tokens" not in body and "messages" in body:
            body["max_tokens"] = MAX_GENERATED_TOKENS
        if "max_output_tokens" not in body and "input" in body:  # /v1/responses
            body["max_output_tokens"] = MAX_GENERATED_TOKENS
    return case


def is_openai_error(response: httpx.Response) -> bool:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return (
        isinstance(error, dict)
        and set(error) == {"message", "type", "param", "code"}
        and isinstance(error["message"], str)
        and bool(error["message"])
    )


def test_every_route_survives_generated_requests(fuzz_gateway: Gateway) -> None:
    admin = {"authorization": f"Bearer {ADMIN}"}
    raw = httpx.get(f"{fuzz_gateway.url}/openapi.json", headers=admin)
    assert raw.status_code == 200
    schema = schemathesis.openapi.from_dict(raw.json())
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/v1/chat/completions", "/admin/align", "/admin/export", "/v1/feedback"} <= paths

    statuses: Counter[int] = Counter()
    failures: list[str] = []
    client = httpx.Client(
        base_url=fuzz_gateway.url,
        headers={"authorization": f"Bearer {ADMIN}"},
        timeout=120,
    )

    def fuzz(op: Any, mode: GenerationMode, examples: int) -> None:
        @settings(
            max_examples=examples,
            deadline=None,
            derandomize=True,  # the same cases in every run: CI is reproducible
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(st.tuples(op.as_strategy(generation_mode=mode), st.booleans()))
        def run(drawn: tuple[Any, bool]) -> None:
            case = aim_at_the_model(*drawn)
            kwargs = case.as_transport_kwargs(base_url=fuzz_gateway.url)
            headers = {**kwargs["headers"], "authorization": f"Bearer {ADMIN}"}
            content = kwargs.get("data")
            if content is None and "json" in kwargs:
                content = json.dumps(kwargs["json"]).encode()
            response = client.request(
                kwargs["method"],
                kwargs["url"],
                params=kwargs.get("params") or None,
                headers=headers,
                content=content,
            )
            statuses[response.status_code] += 1
            where = f"{mode.value} {op.method.upper()} {op.path}: {response.status_code}"
            if response.status_code >= 500:
                failures.append(f"{where} {response.text[:300]} for {case.body!r:.300}")
            elif response.status_code >= 400 and not is_openai_error(response):
                failures.append(f"{where} not an OpenAI error: {response.text[:200]}")

        run()

    nothing_to_negate = []
    for op in operations:
        for mode, examples in EXAMPLES.items():
            try:
                fuzz(op, mode, examples)
            except Unsatisfiable:  # e.g. no parameters at all: no invalid request exists
                nothing_to_negate.append(f"{mode.value} {op.method.upper()} {op.path}")
    print("no cases generated for:", nothing_to_negate)
    client.close()
    total = sum(statuses.values())
    server_errors = sum(n for s, n in statuses.items() if s >= 500)
    print(f"fuzz: {total} requests, {server_errors} 5xx, statuses {dict(sorted(statuses.items()))}")
    assert failures == [], "\n".join(failures[:20])
    assert total >= 2000
    # The gateway is still healthy and answers.
    assert httpx.get(f"{fuzz_gateway.url}/health").status_code == 200
