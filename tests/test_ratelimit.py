"""The per-key token bucket, on a fake clock."""

from __future__ import annotations

import pytest

from server.errors import RateLimited
from server.ratelimit import RateLimiter


def test_a_key_gets_its_burst_then_waits_and_keys_are_independent() -> None:
    now = [0.0]
    limiter = RateLimiter(6, "feedback requests", clock=lambda: now[0])  # one per 10 s
    for _ in range(6):
        limiter.check("alice")
    with pytest.raises(RateLimited) as refused:
        limiter.check("alice")
    assert refused.value.status_code == 429 and refused.value.headers == {"retry-after": "10"}
    limiter.check("bob")  # another key's bucket is full
    now[0] = 9.0
    with pytest.raises(RateLimited):
        limiter.check("alice")
    now[0] = 10.5
    limiter.check("alice")  # one token came back


def test_zero_means_no_limit() -> None:
    limiter = RateLimiter(0, "feedback requests")
    for _ in range(10_000):
        limiter.check("alice")
