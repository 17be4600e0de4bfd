"""Server-sent-event frames for stream chunks, serialized once per stream instead of per token.

A stream's chunks differ only in their choices: the envelope (id, object, created, model,
usage) is serialized once, and a plain-text choice (no log-probabilities) is written with one
``json.dumps`` of its text. The bytes equal pydantic's ``model_dump_json`` of the same chunk
(tested), so clients see no difference; a choice with log-probabilities takes the model path.
"""

from __future__ import annotations

import json

from pydantic import BaseModel

_CHOICES = '"choices":[]'


class StreamFrames:
    def __init__(self, empty_chunk: BaseModel):
        """``empty_chunk``: the stream's chunk model with ``choices=[]`` and no usage."""
        envelope = empty_chunk.model_dump_json()
        head, sep, tail = envelope.partition(_CHOICES)
        if not sep:
            raise ValueError("the chunk model has no empty choices list")
        self._head = b"data: " + head.encode() + b'"choices":['
        self._tail = b"]" + tail.encode() + b"\n\n"

    def frame(self, choices: list[str]) -> bytes:
        """The SSE frame of a chunk whose choices are already JSON."""
        return self._head + ",".join(choices).encode() + self._tail


def _json_text(text: str) -> str:
    # pydantic writes UTF-8 as is and escapes only what JSON requires; so does this.
    return json.dumps(text, ensure_ascii=False)


def _json_reason(reason: str | None) -> str:
    return "null" if reason is None else _json_text(reason)


def chat_text_choice(index: int, content: str, finish_reason: str | None) -> str:
    return (
        f'{{"index":{index},"delta":{{"role":null,"content":{_json_text(content)}}},'
        f'"logprobs":null,"finish_reason":{_json_reason(finish_reason)}}}'
    )


def completion_text_choice(index: int, text: str, finish_reason: str | None) -> str:
    return (
        f'{{"index":{index},"text":{_json_text(text)},'
        f'"logprobs":null,"finish_reason":{_json_reason(finish_reason)}}}'
    )
