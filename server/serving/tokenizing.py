"""Rendering and tokenization of long inputs off the event loop, on one worker thread, as
vLLM's OpenAI server runs its tokenizer (``ThreadPoolExecutor(max_workers=1)``).

A long input's template and tokenization take from tens of milliseconds to seconds; on the
event loop they would stall every other request, stream and health check meanwhile. A short
one (under ``OFF_LOOP_CHARS``) is rendered on the loop: handing it to a thread costs more
than it takes, and it would spread a burst of requests out in time (a burst reaches a
cluster's router together, so its load-aware routing sees it as one). One thread for the long
ones: our calls never change the tokenizer's truncation or padding, the only calls that
mutate a fast tokenizer, so the loop and that thread may encode at once.

Owns: the thread and the threshold. Does not know: what is rendered (any callable).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from server.telemetry.tracing import span

P = ParamSpec("P")
T = TypeVar("T")

OFF_LOOP_CHARS = 20_000  # characters of input text: ~5,000 tokens
_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aligngate-tokenize")


async def off_loop(chars: int, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)``: on the tokenizing thread when the input is ``chars`` long or
    longer, else here; its exception is raised here either way."""
    with span("render", code__function=getattr(fn, "__qualname__", None), input__chars=chars):
        if chars < OFF_LOOP_CHARS:
            return fn(*args, **kwargs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_THREAD, functools.partial(fn, *args, **kwargs))


def text_size(value: object) -> int:
    """Characters of text in a request's messages or prompt (strings, lists, dicts)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(text_size(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(text_size(v) for v in value)
    return 0
