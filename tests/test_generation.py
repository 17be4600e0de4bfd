"""Context-length arithmetic and stream merging, without an engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from server.errors import ContextLengthExceeded
from server.serving.generation import merged, resolve_max_tokens


def test_max_tokens_defaults_to_the_room_left() -> None:
    assert resolve_max_tokens(None, 100, 2048, prompt_param="messages") == 1948


def test_max_tokens_that_fits_is_kept() -> None:
    assert resolve_max_tokens(1948, 100, 2048, prompt_param="messages") == 1948


def test_prompt_plus_max_tokens_over_the_context_names_max_tokens() -> None:
    with pytest.raises(ContextLengthExceeded) as caught:
        resolve_max_tokens(1949, 100, 2048, prompt_param="messages")
    assert caught.value.param == "max_tokens"
    assert "2049" in caught.value.message


def test_prompt_filling_the_context_names_the_prompt() -> None:
    with pytest.raises(ContextLengthExceeded) as caught:
        resolve_max_tokens(None, 2048, 2048, prompt_param="prompt")
    assert caught.value.param == "prompt"


async def _numbers(start: int, count: int, delay: float) -> AsyncIterator[int]:
    for i in range(start, start + count):
        await asyncio.sleep(delay)
        yield i


async def test_merged_tags_items_with_their_source() -> None:
    items = [x async for x in merged([_numbers(0, 3, 0.001), _numbers(100, 2, 0.002)])]
    assert sorted(items) == [(0, 0), (0, 1), (0, 2), (1, 100), (1, 101)]


async def test_merged_reraises_a_source_error() -> None:
    async def broken() -> AsyncIterator[int]:
        yield 1
        raise RuntimeError("engine failed")

    with pytest.raises(RuntimeError, match="engine failed"):
        _ = [x async for x in merged([broken(), _numbers(0, 5, 0.01)])]
