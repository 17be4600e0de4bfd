"""Pre-serialized stream frames are byte for byte what pydantic writes for the same chunk."""

from __future__ import annotations

import random

import pytest

from server.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    Completion,
    CompletionChoice,
)
from server.serving.stream_frames import StreamFrames, chat_text_choice, completion_text_choice

EDGE_TEXTS = [
    "", " hello", 'quo"te', "back\\slash", "nl\n\t\r", "\x00\x01\x1f\x7f", "é中😀",
    "\u2028\u2029", "</script><b>", "\ud7ff\ue000\uffff", "{\"choices\":[]}",
]  # fmt: skip


def _texts() -> list[str]:
    rng = random.Random(7)
    texts = list(EDGE_TEXTS)
    while len(texts) < 500:
        text = "".join(chr(rng.randrange(0, 0x11000)) for _ in range(rng.randrange(1, 12)))
        if not any(0xD800 <= ord(c) <= 0xDFFF for c in text):  # lone surrogates: not UTF-8
            texts.append(text)
    return texts


def _pydantic_frame(chunk: ChatCompletionChunk | Completion) -> bytes:
    return b"data: " + chunk.model_dump_json().encode() + b"\n\n"


@pytest.mark.parametrize("finish_reason", [None, "stop", "length"])
def test_chat_frames_equal_pydantic(finish_reason: str | None) -> None:
    envelope = dict(id="chatcmpl-1", created=1700000000, model='smol"lm')
    frames = StreamFrames(ChatCompletionChunk(**envelope, choices=[]))
    for text in _texts():
        expected = ChatCompletionChunk(
            **envelope,
            choices=[
                ChatChunkChoice(
                    index=0, delta=ChatDelta(content=text), finish_reason=finish_reason
                ),
                ChatChunkChoice(index=3, delta=ChatDelta(content=text[::-1])),
            ],
        )
        got = frames.frame(
            [chat_text_choice(0, text, finish_reason), chat_text_choice(3, text[::-1], None)]
        )
        assert got == _pydantic_frame(expected), repr(text)


@pytest.mark.parametrize("finish_reason", [None, "stop", "length"])
def test_completion_frames_equal_pydantic(finish_reason: str | None) -> None:
    envelope = dict(id="cmpl-1", created=1700000000, model="m")
    frames = StreamFrames(Completion(**envelope, choices=[]))
    for text in _texts():
        expected = Completion(
            **envelope,
            choices=[CompletionChoice(index=5, text=text, finish_reason=finish_reason)],
        )
        got = frames.frame([completion_text_choice(5, text, finish_reason)])
        assert got == _pydantic_frame(expected), repr(text)


def test_envelope_needs_empty_choices() -> None:
    with pytest.raises(ValueError):
        StreamFrames(
            Completion(
                id="x",
                created=1,
                model="m",
                choices=[CompletionChoice(index=0, text="", finish_reason=None)],
            )
        )
