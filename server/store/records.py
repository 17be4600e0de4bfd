"""Rows of the store as plain data (no SQL, no HTTP)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

ANONYMOUS_KEY = "anonymous"


@dataclass(frozen=True, slots=True)
class ChoiceRecord:
    index: int
    text: str
    finish_reason: str | None
    # Only for a completions request with several prompts: this choice's own prompt.
    prompt_text: str | None = None
    # The ids the engine produced, as it produced them (older records: None).
    token_ids: list[int] | None = None
    # Only with several prompts: this choice's own prompt ids.
    prompt_token_ids: list[int] | None = None
    # The assistant message the client got, when tool calls made it other than ``text``
    # (``{content, tool_calls}``); ``text`` stays what the model wrote.
    message: dict[str, Any] | None = None


@dataclass(slots=True)
class CompletionRecord:
    id: str
    created_at: float
    endpoint: str  # "chat" | "completions" | "responses"
    model: str
    family: str
    template_fingerprint: str
    request: Any  # the messages (chat) or the prompt (completions), as sent
    prompt_text: str
    sampling: dict[str, Any]
    choices: list[ChoiceRecord]
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    status: str = "finished"
    adapter: str | None = None
    key_id: str | None = None
    user: str | None = None
    prompt_token_ids: list[int] | None = None  # as the engine received them
    prompt_bos: str | None = None  # BOS text, when the engine put BOS before prompt_text
    # The request's ``metadata`` (OpenAI's Stored Completions); rows of its own table.
    metadata: dict[str, str] | None = None
    request_id: str | None = None  # the request's x-request-id (m007; older rows: None)

    @property
    def conversation(self) -> bool:
        """Whether ``request`` holds messages (chat, and responses as chat messages)."""
        return self.endpoint in ("chat", "responses")

    @property
    def uses_tools(self) -> bool:
        """Whether tools took part: a tool message or an assistant's calls in the request,
        or calls in an answer. Such a conversation is more than text turns, so exports for
        training and the judges leave it out."""
        sent = self.request if self.conversation and isinstance(self.request, list) else []
        return any(
            isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls")) for m in sent
        ) or any(c.message is not None and c.message.get("tool_calls") for c in self.choices)

    def prompt_of(self, choice_index: int) -> str:
        choice = self.choices[choice_index]
        return choice.prompt_text if choice.prompt_text is not None else self.prompt_text

    def prompt_ids_of(self, choice_index: int) -> list[int] | None:
        choice = self.choices[choice_index]
        if choice.prompt_token_ids is not None:
            return choice.prompt_token_ids
        return self.prompt_token_ids

    def row(self) -> dict[str, Any]:
        """The ``completions`` row (metadata is not a column of it)."""
        values = asdict(self)
        values["choices"] = [asdict(c) for c in self.choices]
        values.pop("metadata")
        return values

    @classmethod
    def from_row(cls, row: Any) -> CompletionRecord:
        values = dict(row._mapping)
        values["choices"] = [ChoiceRecord(**c) for c in values["choices"]]
        return cls(**values)


@dataclass(slots=True)
class FeedbackCreate:
    completion_id: str
    choice_index: int = 0
    judgment: str | None = None
    rating: int | None = None
    rating_scale: str | None = None  # "thumbs" | "stars"
    label: str | None = None  # "desirable" | "undesirable"
    preferred_over: str | None = None
    preferred_over_choice: int | None = None  # which choice of ``preferred_over`` lost
    annotator: str | None = None
    idempotency_key: str | None = None
    key_id: str = ANONYMOUS_KEY
    reward: float | None = None  # explicit scalar reward (stored as the row's explicit_reward)
    request_id: str | None = None  # the request's x-request-id (a replay may carry another)

    def payload(self) -> dict[str, Any]:
        """What an idempotent replay must repeat exactly."""
        values = asdict(self)
        values.pop("idempotency_key")
        values.pop("key_id")
        values.pop("request_id")
        for field in ("preferred_over_choice", "reward"):
            if values[field] is None:
                # Absent, as before the field existed: a replay's hash stays the same.
                values.pop(field)
        return values


@dataclass(slots=True)
class FeedbackRow:
    id: str
    created_at: float
    completion_id: str
    choice_index: int
    model: str
    judgment: str | None
    rating: int | None
    rating_scale: str | None
    label: str | None
    preferred_over: str | None
    annotator: str | None
    key_id: str
    idempotency_key: str | None
    payload_hash: str
    reviewed: bool = False
    preferred_over_choice: int | None = None
    seq: int | None = None  # commit order (see schema.counters)
    # The ``reward`` column (m006); named apart from the ``reward()`` method.
    explicit_reward: float | None = None
    request_id: str | None = None  # m007

    @classmethod
    def from_row(cls, row: Any) -> FeedbackRow:
        values = dict(row._mapping)
        values["explicit_reward"] = values.pop("reward", None)
        return cls(**values)

    @property
    def rejected_choice(self) -> int:
        return self.preferred_over_choice or 0

    def reward(self) -> float | None:
        """The scalar reward: the explicit one when set, else the rating's or the label's.

        Scale: ratings, labels and score judges all sit on [0, 1] — thumbs 0 or 1, stars
        (r - 1) / 4, labels 0 or 1, a score judge's 1-10 score stored as (score - 1) / 9.
        An explicit reward a user sent is taken as given (any finite value)."""
        if self.explicit_reward is not None:
            return self.explicit_reward
        return reward_of(self.rating, self.rating_scale, self.label)

    def polarity(self) -> bool | None:
        return polarity_of(self.rating, self.rating_scale, self.label, bool(self.judgment))


def reward_of(rating: int | None, rating_scale: str | None, label: str | None) -> float | None:
    """The rating on [0, 1] (thumbs: 0 or 1; stars: (r - 1) / 4), else the label's."""
    if rating is not None:
        if rating_scale == "thumbs":
            return 1.0 if rating > 0 else 0.0
        return (rating - 1) / 4
    if label is not None:
        return 1.0 if label == "desirable" else 0.0
    return None


def polarity_of(
    rating: int | None, rating_scale: str | None, label: str | None, judged: bool
) -> bool | None:
    """True: desirable, False: undesirable, None: neutral or no such signal.

    The label wins; then the rating; a judgment alone is a reason to reject (CUT)."""
    if label is not None:
        return label == "desirable"
    reward = reward_of(rating, rating_scale, label)
    if reward is not None:
        return None if reward == 0.5 else reward > 0.5
    if judged:
        return False
    return None


@dataclass(slots=True)
class JudgeCallRow:
    """One verdict of an AI judge (see ``schema.judge_calls``)."""

    id: str
    created_at: float
    judge: str
    kind: str
    judge_model: str
    prompt_version: str
    completion_id: str
    choice_index: int
    verdict: dict[str, Any]
    raw_replies: list[str]
    latency_ms: float
    requests: int
    prompt_tokens: int
    completion_tokens: int
    source: str
    other_choice_index: int | None = None
    feedback_id: str | None = None

    @classmethod
    def from_row(cls, row: Any) -> JudgeCallRow:
        return cls(**dict(row._mapping))
