"""Per-key rate limits: a token bucket per API key id, refilled evenly at ``per_minute`` and
holding at most ``per_minute``.

Three buckets use it: feedback requests (feedback later trains models: one key cannot flood
the loop with judgments), generation requests, and generation tokens. A key may have its own
limit (the keys file's ``rpm=`` / ``tpm=``); the others share the default.

Token limits cannot know a completion's length in advance: a request is admitted if its
key's bucket holds its prompt, and the completion's tokens are charged when it ends. The
bucket may go below zero then, and the key waits until it refills (as LiteLLM's and OpenAI's
token limits behave).

Owns: the buckets. Does not know: HTTP (``RateLimited`` carries its Retry-After).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

from server.errors import RateLimited


class RateLimiter:
    def __init__(
        self,
        per_minute: int,
        what: str,
        clock: Callable[[], float] = time.monotonic,
        per_key: Mapping[str, int] | None = None,
    ):
        self.per_minute = per_minute  # 0: no limit
        self.what = what
        self.per_key = dict(per_key or {})
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def limit(self, key: str) -> int:
        return self.per_key.get(key, self.per_minute)

    def check(self, key: str, cost: float = 1.0) -> None:
        """Take ``cost`` from ``key``'s bucket, or raise ``RateLimited``. A cost above the
        whole limit is admitted from a full bucket (which it leaves in debt)."""
        limit = self.limit(key)
        if limit <= 0:
            return
        tokens, now = self._level(key, limit)
        needed = min(cost, float(limit))
        if tokens < needed:
            self._buckets[key] = (tokens, now)
            wait = max(1, math.ceil((needed - tokens) / (limit / 60.0)))
            raise RateLimited(
                f"Rate limit reached: {limit} {self.what} per minute for this API key.",
                retry_after_s=wait,
            )
        self._buckets[key] = (tokens - cost, now)

    def charge(self, key: str, amount: float) -> None:
        """Take ``amount`` after the fact (a completion's tokens); the bucket may go negative."""
        limit = self.limit(key)
        if limit <= 0 or amount <= 0:
            return
        tokens, now = self._level(key, limit)
        self._buckets[key] = (tokens - amount, now)

    def refund(self, key: str, amount: float = 1.0) -> None:
        """Give back what ``check`` took for a request refused later on."""
        limit = self.limit(key)
        if limit <= 0 or key not in self._buckets:
            return
        tokens, now = self._level(key, limit)
        self._buckets[key] = (min(float(limit), tokens + amount), now)

    def _level(self, key: str, limit: int) -> tuple[float, float]:
        now = self._clock()
        tokens, at = self._buckets.get(key, (float(limit), now))
        return min(float(limit), tokens + (now - at) * limit / 60.0), now
