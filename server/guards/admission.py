"""Backpressure: a bound on the requests in flight per engine.

vLLM queues whatever it is given; a gateway in front of it must not. Each request holds one
slot of its engine (an adapter shares its base's) from admission to its last byte; past the
bound it is refused at once with 429 and ``Retry-After``, before anything is allocated.

Owns: the counts. Does not know: HTTP (the caller turns ``Overloaded`` into the answer).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

from server.errors import Overloaded


class Admission:
    def __init__(self) -> None:
        self._in_flight: dict[str, int] = defaultdict(int)

    def in_flight(self, engine: str) -> int:
        return self._in_flight[engine]

    def admit(self, engine: str, limit: int) -> Callable[[], None]:
        """Take a slot of ``engine`` or raise ``Overloaded``; returns the slot's release,
        which is safe to call more than once."""
        if self._in_flight[engine] >= limit:
            raise Overloaded(
                f"Model `{engine}` has {limit} requests in flight, its limit; retry shortly."
            )
        self._in_flight[engine] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._in_flight[engine] -= 1

        return release
