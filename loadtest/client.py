"""One streaming request to an OpenAI-compatible server, timed the way ``vllm bench serve`` does.

Failures are data: every outcome (HTTP error, error event in the stream, dropped connection,
timeout) comes back as a ``RequestResult`` with ``error`` set; nothing here raises.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import time
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from loadtest.stats import RequestResult
from loadtest.workload import Item

Endpoint = Literal["chat", "completions"]


class TargetError(ValueError):
    """A target the load generator refuses (not loopback, malformed)."""


@dataclass(frozen=True, slots=True)
class Target:
    base_url: str  # e.g. http://127.0.0.1:8000 (no /v1)
    model: str
    endpoint: Endpoint = "chat"
    api_key: str | None = None
    ignore_eos: bool = True
    temperature: float = 0.0

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"


def require_loopback(base_url: str) -> None:
    """Refuse a target resolving to a non-loopback address: this tool loads this machine only."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetError(f"not an http(s) URL: {base_url!r}")
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 80, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise TargetError(f"cannot resolve {parts.hostname!r}: {exc}") from exc
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_loopback:
            raise TargetError(f"{base_url} resolves to {address}, which is not a loopback address")


def request_body(target: Target, item: Item) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": target.model,
        "max_tokens": item.max_tokens,
        "temperature": target.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.ignore_eos:
        # Every request produces exactly max_tokens, so servers are compared on equal work.
        body["ignore_eos"] = True
    if target.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": item.prompt}]
    else:
        body["prompt"] = item.prompt
    return body


def _content(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    delta = choice.get("delta")
    if delta is not None:
        return delta.get("content") or ""
    return choice.get("text") or ""


def _error_message(payload: bytes, status: int) -> str:
    try:
        error = json.loads(payload).get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = payload[:200].decode("utf-8", "replace")
    return f"HTTP {status}: {message}"


async def send(
    client: httpx.AsyncClient, target: Target, item: Item, run_start: float
) -> RequestResult:
    """Send one streaming request; time its chunks against ``time.perf_counter``."""
    sent = time.perf_counter()
    result = RequestResult(started_at=sent - run_start, expected_tokens=item.max_tokens)
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    last = sent
    try:
        async with client.stream(
            "POST", target.base_url + target.path, json=request_body(target, item), headers=headers
        ) as response:
            result.status = response.status_code
            if response.status_code != 200:
                result.error = _error_message(await response.aread(), response.status_code)
                result.latency = time.perf_counter() - sent  # how fast a refusal comes
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = _error_message(data.encode(), result.status or 0)
                    return result
                if _content(chunk):
                    if result.ttft is None:
                        result.ttft = now - sent
                    else:
                        result.itl.append(now - last)
                    last = now
                usage = chunk.get("usage")
                if usage:
                    result.output_tokens = int(usage.get("completion_tokens") or 0)
                    result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        result.latency = time.perf_counter() - sent
        if result.ttft is None:
            result.error = "stream ended without content"
        elif result.output_tokens == 0:
            # A server without usage in streams: count content chunks instead.
            result.output_tokens = 1 + len(result.itl)
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    except (ValueError, KeyError, TypeError) as exc:  # malformed JSON or chunk shape
        result.error = f"bad stream: {type(exc).__name__}: {exc}"
    return result
