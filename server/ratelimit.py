"""Per-key rate limits: a token bucket per API key id (``per_minute`` refilled evenly,
bursts up to ``per_minute``). Used for feedback, which later trains models: one key cannot
flood the loop with judgments.

Owns: the buckets. Does not know: HTTP (``RateLimited`` carries its Retry-After).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from server.errors import RateLimited


class RateLimiter:
    def __init__(self, per_minute: int, what: str, clock: Callable[[], float] = time.monotonic):
        self.per_minute = per_minute
        self.what = what
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def check(self, key: str) -> None:
        """Take one token of ``key``'s bucket, or raise ``RateLimited``."""
        if self.per_minute <= 0:
            return
        now = self._clock()
        rate = self.per_minute / 60.0
        tokens, at = self._buckets.get(key, (float(self.per_minute), now))
        tokens = min(float(self.per_minute), tokens + (now - at) * rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            wait = math.ceil((1.0 - tokens) / rate)
            raise RateLimited(
                f"Rate limit reached: {self.per_minute} {self.what} per minute per API key.",
                retry_after_s=wait,
            )
        self._buckets[key] = (tokens - 1.0, now)
