"""Streams that carry each other's tokens: a replica hands a front end the steps of all its
requests in one object, on whichever of that front end's streams asks next.

Why: Ray moves a stream one object at a time, and each object costs the replica and the
front end a fixed amount of CPU (serializing, a gRPC report, the router's hand-off),
~1.3 ms per token here, all of it taken from the engine on a node where they share cores.
With one object per request per engine step, 16 requests cost 16 objects a step; sharing,
about one. Each request still has its own Ray Serve call (routing, back-pressure, the
replica's death raised on it, its errors), only its deltas may travel on another's.

The protocol (``Outbox`` on the replica, ``Inbox`` on the front end): every step of a
request becomes an entry ``(request_id, seq, step)``, and its end one more entry with
step ``None``. A request's stream takes *every* entry waiting for its front end each time
it can send, and ends once its own end has been taken (by itself or another): so an entry
always has a stream that will carry it. Entries of one request may arrive out of order
(two streams), so the inbox orders them by ``seq``. A client that goes away does not
cancel its call (an entry of another request could be lost with it): the front end asks
the replica to abort the request, and the call ends as any other.
Does not know: Ray, engines, HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

from server.cluster.stream_items import EncodedStep, encode_step
from server.engine.types import ChoiceDelta

Entry = tuple[str, int, EncodedStep | None]  # request id, sequence number, step or end
# How long a request whose own call ended waits for entries still on other streams.
STRAGGLER_TIMEOUT_S = 10.0


class Outbox:
    """A replica's entries for one front end, for whichever of its streams asks next."""

    def __init__(self) -> None:
        self._entries: list[Entry] = []
        self._ready = asyncio.Event()
        self._ended: set[str] = set()  # requests whose end entry was taken
        self.streams = 0  # open streams of this front end (the replica drops an idle box)

    def put(self, entry: Entry) -> None:
        self._entries.append(entry)
        self._ready.set()

    def take(self) -> tuple[Entry, ...]:
        """Every waiting entry (this stream sends them all)."""
        entries = tuple(self._entries)
        self._entries.clear()
        self._ended.update(rid for rid, _, step in entries if step is None)
        self._ready.set()  # wake the streams whose end was just taken, to leave
        self._ready.clear()
        return entries

    def end_taken(self, request_id: str) -> bool:
        if request_id in self._ended:
            self._ended.discard(request_id)
            return True
        return False

    @property
    def empty(self) -> bool:
        return not self._entries

    async def wait(self) -> None:
        """Until an entry waits or an end was taken."""
        if self._entries:
            return
        await self._ready.wait()


async def feed(request_id: str, steps: AsyncIterator[list[ChoiceDelta]], outbox: Outbox) -> None:
    """A request's engine steps into its front end's outbox, then its end (also after an
    error, which ``carry`` then raises on the request's own call)."""
    seq = 0
    try:
        async with contextlib.aclosing(steps):
            async for step in steps:
                outbox.put((request_id, seq, encode_step(step)))
                seq += 1
    finally:
        outbox.put((request_id, seq, None))


async def carry(
    request_id: str, steps: AsyncIterator[list[ChoiceDelta]], outbox: Outbox
) -> AsyncIterator[tuple[Entry, ...]]:
    """A request's call on the replica: feeds its steps to the outbox, and sends every
    entry waiting there each time it can, until its own end has been taken; then the
    engine's error, if there was one. Closing it (Ray Serve cancelled the call) closes the
    engine's stream, which aborts the request."""
    outbox.streams += 1
    feeding = asyncio.create_task(feed(request_id, steps, outbox))
    try:
        while True:
            if not outbox.empty:
                yield outbox.take()
            if outbox.end_taken(request_id):
                break
            await outbox.wait()
        await feeding
    finally:
        outbox.streams -= 1
        if not feeding.done():
            feeding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeding


class Inbox:
    """One request's entries on the front end, in order, from any of the streams."""

    def __init__(self) -> None:
        self._pending: dict[int, EncodedStep | None] = {}
        self._next = 0
        self._changed = asyncio.Event()
        self.ended = False  # its end entry came, in order
        self.call_over = False  # its own call ended (``error`` says how)
        self.error: BaseException | None = None
        self.replica: Any = None  # the replica that took it, once its call says

    def add(self, seq: int, step: EncodedStep | None) -> None:
        self._pending[seq] = step
        self._changed.set()

    def set_replica(self, replica: Any) -> None:
        self.replica = replica
        self._changed.set()

    def finish_call(self, error: BaseException | None = None) -> None:
        self.call_over, self.error = True, error
        self._changed.set()

    def ready(self) -> Iterator[EncodedStep]:
        """The steps that are next in order (none once the end came)."""
        while not self.ended and self._next in self._pending:
            step = self._pending.pop(self._next)
            self._next += 1
            if step is None:
                self.ended = True
                return
            yield step

    async def changed(self, within_s: float | None = None) -> bool:
        """Wait until something arrives (False: ``within_s`` passed first)."""
        try:
            await asyncio.wait_for(self._changed.wait(), within_s)
        except TimeoutError:
            return False
        finally:
            self._changed.clear()
        return True


class StreamLost(Exception):
    """A request's call ended, but its last entries never came on any stream."""


async def receive(
    inbox: Inbox, straggler_timeout_s: float = STRAGGLER_TIMEOUT_S
) -> AsyncIterator[EncodedStep]:
    """A request's steps in order, as its front end's streams deliver them (``Inbox``);
    over once its end came and its own call ended. Its call's error is raised (after the
    steps that came before it); ``StreamLost`` when the call ended without the end and
    nothing more came for ``straggler_timeout_s``."""
    while True:
        for step in inbox.ready():
            yield step
        if inbox.call_over:
            if inbox.error is not None:
                raise inbox.error
            if inbox.ended:
                return
            if not await inbox.changed(within_s=straggler_timeout_s):
                raise StreamLost("the call ended without the request's last steps")
        else:
            await inbox.changed()
