"""The per-key token bucket, on a fake clock."""

from __future__ import annotations

import pytest

from server.errors import RateLimited
from server.guards.ratelimit import RateLimiter


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


def test_a_cost_is_taken_whole_and_charges_after_the_fact_put_the_key_in_debt() -> None:
    now = [0.0]
    tokens = RateLimiter(600, "tokens", clock=lambda: now[0])  # 10 a second
    tokens.check("alice", cost=500)
    with pytest.raises(RateLimited) as refused:
        tokens.check("alice", cost=200)  # 100 left: 10 s until 200
    assert refused.value.headers == {"retry-after": "10"}
    tokens.check("alice", cost=100)
    tokens.charge("alice", 300)  # the completion's tokens: 300 in debt
    now[0] = 30.0
    with pytest.raises(RateLimited):
        tokens.check("alice", cost=1)  # back to 0 after 30 s, still short of 1
    now[0] = 31.0
    tokens.check("alice", cost=1)


def test_a_cost_above_the_limit_needs_a_full_bucket() -> None:
    now = [0.0]
    tokens = RateLimiter(60, "tokens", clock=lambda: now[0])
    tokens.check("alice", cost=1000)  # a full bucket admits it, 940 in debt
    with pytest.raises(RateLimited) as refused:
        tokens.check("alice", cost=1000)
    assert refused.value.headers == {"retry-after": str(940 + 60)}


def test_keys_with_their_own_limit() -> None:
    limiter = RateLimiter(1, "generation requests", per_key={"bob": 3, "admin": 0})
    limiter.check("alice")
    with pytest.raises(RateLimited, match="1 generation requests per minute"):
        limiter.check("alice")
    for _ in range(3):
        limiter.check("bob")
    with pytest.raises(RateLimited, match="3 generation requests per minute"):
        limiter.check("bob")
    for _ in range(100):
        limiter.check("admin")  # 0: no limit for this key


def test_a_refund_gives_back_what_a_refused_request_took() -> None:
    now = [0.0]
    limiter = RateLimiter(2, "generation requests", clock=lambda: now[0])
    limiter.refund("alice")  # nothing taken yet: nothing to give
    limiter.check("alice")
    limiter.check("alice")
    limiter.refund("alice")  # the second was refused further on
    limiter.check("alice")
    with pytest.raises(RateLimited):
        limiter.check("alice")
    limiter.refund("alice", 10)
    assert limiter._level("alice", 2)[0] == 2.0  # never above the limit
