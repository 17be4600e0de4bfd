"""Rendering and tokenization off the event loop, on one worker thread, as vLLM's OpenAI
server runs its tokenizer (``ThreadPoolExecutor(max_workers=1)``).

A long input's template and tokenization take tens of milliseconds to seconds; on the event
loop they would stall every other request, stream and health check meanwhile. One thread,
not many: a Hugging Face fast tokenizer is one Rust object that each call re-configures
(truncation, padding), and two threads in it at once fail with "Already borrowed".

Owns: the thread. Does not know: what is rendered (any callable).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aligngate-tokenize")


async def off_loop(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)`` on the tokenizing thread; its exception is raised here."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_THREAD, functools.partial(fn, *args, **kwargs))
