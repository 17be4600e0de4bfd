"""Messages → the exact prompt text and token ids the engine receives.

Owns: the model's tokenizer and prompt format. One renderer serves HTTP requests, batch
generation and training-data export, so the prompt a model is trained on is the one it is
served with.
Does not know: HTTP, engines, sampling.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class RenderError(ValueError):
    """A conversation this model's format cannot express."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True, slots=True)
class RenderedPrompt:
    text: str
    token_ids: list[int]


class ChatTemplateRenderer:
    """The checkpoint's own chat template (``tokenizer.apply_chat_template``)."""

    family = "chat"

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        template = getattr(tokenizer, "chat_template", None)
        self.has_chat_template = isinstance(template, str) and bool(template)
        self.template_name = "checkpoint-chat-template" if self.has_chat_template else "none"
        self.template_hash = (
            hashlib.sha256(template.encode()).hexdigest()[:12] if self.has_chat_template else ""
        )

    @classmethod
    def load(cls, path: str | Path, *, trust_remote_code: bool = False) -> ChatTemplateRenderer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        return cls(tokenizer)

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    def render_chat(self, messages: list[Message]) -> RenderedPrompt:
        if not self.has_chat_template:
            raise RenderError(
                "This model has no chat template; use /v1/completions or set its `family` "
                "in the models file.",
                param="messages",
            )
        if messages[-1].role == "assistant":
            raise RenderError("The last message must not be from the assistant.", "messages")
        text = self.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            tokenize=False,
            add_generation_prompt=True,
        )
        # The template already placed any BOS it wants; adding special tokens would double it.
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return RenderedPrompt(text=text, token_ids=list(ids))

    def render_text(self, prompt: str) -> RenderedPrompt:
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return RenderedPrompt(text=prompt, token_ids=list(ids))

    def render_ids(self, token_ids: list[int]) -> RenderedPrompt:
        vocab = len(self.tokenizer)
        bad = next((t for t in token_ids if t < 0 or t >= vocab), None)
        if bad is not None:
            raise RenderError(f"token id {bad} is outside the vocabulary (size {vocab}).", "prompt")
        return RenderedPrompt(text=self.tokenizer.decode(token_ids), token_ids=list(token_ids))

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
