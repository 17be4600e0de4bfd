"""OpenAI-compatible request and response models.

Owns: what a client may send (validated with field bounds, unknown fields refused so typos
surface as 400s naming the field) and the shapes sent back. Requests translate themselves
into the engine's ``SamplingSpec``.
Does not know: templates, engines, HTTP status codes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from server.engine.types import SamplingSpec, StructuredSpec
from server.errors import InvalidRequest
from server.models.families import FamilySpec
from server.store import storable

# Public caps; vLLM's own default for n is 16,384.
MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256
MAX_LOGIT_BIAS = 300  # OpenAI's limit on logit_bias entries
MAX_MESSAGES = 512
MAX_MESSAGE_CHARS = 200_000
MAX_STRUCTURE_CHARS = 20_000
# Templates come from the models file only: a client-supplied one could render any prompt
# (and, with some engines, run template code).
CLIENT_TEMPLATE_FIELDS = ("chat_template", "template")
# What a chat template's own arguments would clash with (vLLM passes the rest through).
RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "conversation", "add_generation_prompt",
    "continue_final_message", "tools", "documents", "chat_template", "tokenize",
    "return_dict", "return_tensors", "return_assistant_tokens_mask", "padding",
    "truncation", "max_length", "tokenizer_kwargs", "bos_token", "eos_token"})  # fmt: skip


def _check_template_kwargs(value: Any) -> Any:
    """vLLM's ``chat_template_kwargs``, as far as a template variable can go: string keys,
    scalar values (a string is user text, tokenized as such), none the gateway sets."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("chat_template_kwargs must be an object")
    for key, item in value.items():
        if key in RESERVED_TEMPLATE_KWARGS:
            raise ValueError(f"{key!r} is set by the gateway, not by a template variable")
        if item is not None and not isinstance(item, (str, bool, int, float)):
            raise ValueError(f"{key!r}: values must be strings, numbers, booleans or null")
    return value


TemplateKwargs = Annotated[
    dict[str, str | bool | int | float | None] | None, BeforeValidator(_check_template_kwargs)
]


def _storable(value: str) -> str:
    found = storable.problem(value)
    if found:
        raise ValueError(found)
    return value


# A path or query parameter's text (a request body's is checked by its model, below).
Text = Annotated[str, AfterValidator(_storable)]

# OpenAI's limits on ``metadata``: 16 pairs, keys up to 64 characters, values up to 512.
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512


def check_metadata(value: Any) -> Any:
    # Before pydantic's own dict[str, str] check, so every error names `metadata` itself.
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("metadata must be an object of string keys and string values")
    if len(value) > MAX_METADATA_PAIRS:
        raise ValueError(f"at most {MAX_METADATA_PAIRS} metadata pairs are allowed")
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise ValueError("metadata keys and values must be strings")
        if not key or len(key) > MAX_METADATA_KEY_CHARS:
            raise ValueError(f"a metadata key must have 1 to {MAX_METADATA_KEY_CHARS} characters")
        if len(item) > MAX_METADATA_VALUE_CHARS:
            raise ValueError(
                f"metadata value of `{key}` is longer than {MAX_METADATA_VALUE_CHARS} characters"
            )
        if "\x00" in key or "\x00" in item:
            raise ValueError("metadata must not contain NUL characters")
    return value


Metadata = Annotated[dict[str, str], BeforeValidator(check_metadata)]


class _StorableText(BaseModel):
    """A request body whose every string — nested in lists and dicts, keys included — is
    text the store can keep (``storable``): a 400 naming the field otherwise, whether or not
    the field is stored today."""

    @field_validator("*")
    @classmethod
    def _storable_text(cls, value: Any) -> Any:
        if not isinstance(value, BaseModel):  # a nested model checked its own fields
            found = storable.first_problem(value)
            if found:
                raise ValueError(found)
        return value


class _Strict(_StorableText):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


MAX_TOOLS = 128
TOOL_NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"  # OpenAI's function names, plus vLLM's . and :


class FunctionCallIn(_Strict):
    name: str = Field(pattern=TOOL_NAME_PATTERN)
    arguments: str = Field(max_length=MAX_MESSAGE_CHARS)  # JSON text, as the model wrote it

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        if not value.strip():
            return "{}"  # no arguments
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"a tool call's arguments are JSON text: {exc}") from exc
        if not isinstance(parsed, dict):
            raise ValueError("a tool call's arguments are a JSON object")
        return value


class ToolCallIn(_Strict):
    """An assistant message's call, as the client got it and sends it back."""

    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, max_length=256)
    # An assistant's tool calls, and a tool message's answer to one of them (OpenAI's).
    tool_calls: list[ToolCallIn] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_call_id: str | None = Field(default=None, min_length=1, max_length=256)

    @model_validator(mode="after")
    def _check_shape(self) -> ChatMessage:
        if len(self.text()) > MAX_MESSAGE_CHARS:
            raise ValueError(f"a message is longer than {MAX_MESSAGE_CHARS} characters")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message has tool_calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a tool message, and only one, has the tool_call_id it answers")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is missing (only an assistant's tool calls go without)")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionDefinition(_Strict):
    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str | None = Field(default=None, max_length=MAX_STRUCTURE_CHARS)
    parameters: dict[str, Any] | None = None  # a JSON Schema
    strict: bool | None = None


class ToolDefinition(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str = Field(pattern=TOOL_NAME_PATTERN)


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Strict):
    include_usage: bool = False


class StructuredOutputs(_Strict):
    """vLLM's ``structured_outputs`` extension: constrain the text to a regular expression,
    one of a list of strings, or a JSON Schema (exactly one)."""

    regex: str | None = Field(default=None, min_length=1, max_length=MAX_STRUCTURE_CHARS)
    choice: list[str] | None = Field(default=None, min_length=1, max_length=256)
    json_schema: dict[str, Any] | None = Field(default=None, alias="json")

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [v for v in (self.regex, self.choice, self.json_schema) if v is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of regex, choice, json")
        return self


class JsonSchemaFormat(_Strict):
    name: str = Field(default="schema", max_length=64)
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = Field(default=None, max_length=2000)
    strict: bool | None = None


class ResponseFormat(_Strict):
    """OpenAI's ``response_format``: text, any JSON object, or a JSON Schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_when_asked(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given exactly with type json_schema")
        return self


class _SamplingFields(_Strict):
    """Fields shared by chat and text completions. A field not declared here is kept
    aside (``model_extra``) rather than refused, as vLLM's server does: ``lenient``
    ignores it, or refuses it where it would change the answer."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(max_length=256)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    user: str | None = Field(default=None, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    store: bool | None = None
    # Stored with the record (OpenAI's Stored Completions: filter and update by it).
    metadata: Metadata | None = None
    # vLLM's extra sampling fields, accepted under the same names vLLM's server uses.
    top_k: int | None = Field(default=None, ge=-1, le=1_000_000)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    min_tokens: int = Field(default=0, ge=0, le=1_000_000)
    ignore_eos: bool = False
    # Token controls, with vLLM's meanings: OpenAI's logit_bias ({token id: -100..100},
    # added to the logits), more token ids that end the answer, whether a matched stop
    # string stays in the text, whether special tokens are left out of it.
    logit_bias: dict[str, float] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)
    stop_token_ids: list[int] | None = Field(default=None, max_length=MAX_STOP_SEQUENCES)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # vLLM's: the prompt's token ids and each choice's generated ids in the answer.
    return_token_ids: bool = False
    # Refused when given (see CLIENT_TEMPLATE_FIELDS); declared so the error names them.
    chat_template: None = Field(default=None, exclude=True)
    template: None = Field(default=None, exclude=True)
    # Quark models: which reward quantile to condition on (0 = best); others refuse it.
    quantile: int | None = Field(default=None, ge=0, le=255)
    # Constrained decoding: OpenAI's response_format, or vLLM's structured_outputs.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    def structured_spec(self) -> StructuredSpec | None:
        f = self.response_format
        if self.structured_outputs is not None and f is not None and f.type != "text":
            raise InvalidRequest(
                "give response_format or structured_outputs, not both",
                param="structured_outputs",
            )
        s = self.structured_outputs
        if s is not None:
            return StructuredSpec(
                regex=s.regex,
                choice=tuple(s.choice) if s.choice is not None else None,
                json_schema=json.dumps(s.json_schema) if s.json_schema is not None else None,
            )
        if f is None or f.type == "text":
            return None
        if f.type == "json_object":
            return StructuredSpec(json_object=True)
        assert f.json_schema is not None
        return StructuredSpec(json_schema=json.dumps(f.json_schema.schema_))

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.isdigit():
                raise ValueError(f"logit_bias keys are token ids; got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"a logit_bias value is between -100 and 100; got {bias}")
        return value

    @field_validator("stop_token_ids")
    @classmethod
    def _check_stop_token_ids(cls, value: list[int] | None) -> list[int] | None:
        if any(t < 0 for t in value or []):
            raise ValueError("stop_token_ids are token ids (>= 0)")
        return value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence is longer than {MAX_STOP_CHARS} characters")
        return value

    @field_validator(*CLIENT_TEMPLATE_FIELDS, mode="before")
    @classmethod
    def _no_client_template(cls, value: Any) -> None:
        if value is not None:
            raise ValueError("not accepted: prompt templates come from the models file only")
        return None

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_spec(
        self,
        *,
        max_tokens: int,
        logprobs: int | None,
        family: FamilySpec,
        defaults: Mapping[str, Any],
    ) -> SamplingSpec:
        """Engine settings: the request's fields, else the model's ``defaults`` (the models
        file, the generation config, the family: ``models.decoding``), else OpenAI's."""
        if self.min_tokens > max_tokens:
            raise InvalidRequest(
                f"min_tokens ({self.min_tokens}) is more than max_tokens ({max_tokens})",
                param="min_tokens",
            )

        def pick(name: str, neutral: float) -> Any:
            given = getattr(self, name)
            if given is not None:
                return given
            default = defaults.get(name)
            return neutral if default is None else default

        top_k = pick("top_k", 0)
        return SamplingSpec(
            max_tokens=max_tokens,
            temperature=pick("temperature", 1.0),
            top_p=pick("top_p", 1.0),
            top_k=top_k if top_k > 0 else 0,
            min_p=pick("min_p", 0.0),
            n=self.n,
            stop=self.stop_list() + tuple(s for s in family.stop if s not in self.stop_list()),
            seed=self.seed,
            presence_penalty=pick("presence_penalty", 0.0),
            frequency_penalty=pick("frequency_penalty", 0.0),
            repetition_penalty=pick("repetition_penalty", 1.0),
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            structured=self.structured_spec(),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            logit_bias=tuple((int(t), float(b)) for t, b in (self.logit_bias or {}).items()),
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
        )


def _check_prompt_logprobs(prompt_logprobs: int | None, stream: bool) -> None:
    # vLLM's rule: the prompt's log-probabilities come with a whole answer, not a stream.
    if stream and prompt_logprobs:
        raise InvalidRequest(
            "`prompt_logprobs` are not available when `stream=True`.", param="prompt_logprobs"
        )


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    # vLLM's: each prompt token's log-probability and the k most likely at its position.
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    # vLLM's chat options: the checkpoint chat template's variables (chat-template families;
    # scalars only), and an assistant prefill: the last message, the assistant's, continued.
    chat_template_kwargs: TemplateKwargs = Field(default=None, max_length=32)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # Tool calls, as OpenAI's (served for models whose chat template takes tools).
    tools: list[ToolDefinition] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _prompt_logprobs_not_streamed(self) -> ChatCompletionRequest:
        _check_prompt_logprobs(self.prompt_logprobs, self.stream)
        if not self.tools and self.tool_choice not in (None, "none", "auto"):
            raise InvalidRequest(
                "When using `tool_choice`, `tools` must be set.", param="tool_choice"
            )
        if isinstance(self.tool_choice, NamedToolChoice) and self.tools:
            name = self.tool_choice.function.name
            if name not in {t.function.name for t in self.tools}:
                raise InvalidRequest(
                    f"Tool '{name}' has not been passed in `tools`.", param="tool_choice"
                )
        if self.tools and len({t.function.name for t in self.tools}) != len(self.tools):
            raise InvalidRequest("Each tool's name must be unique.", param="tools")
        if self.continue_final_message and self.add_generation_prompt:
            raise InvalidRequest(
                "Cannot set both `continue_final_message` and `add_generation_prompt` to "
                "true (vLLM's rule): a prefill continues the answer instead of opening one.",
                param="add_generation_prompt",
            )
        return self

    def tool_list(self) -> list[dict[str, Any]]:
        """The tools as OpenAI's dicts (what templates and vLLM's parsers take)."""
        return [t.model_dump(exclude_none=True) for t in self.tools or []]

    def effective_tool_choice(self) -> str | dict[str, Any]:
        """OpenAI's default: ``auto`` with tools, ``none`` without."""
        if not self.tools:
            return "none"
        if self.tool_choice is None:
            return "auto"
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.model_dump()
        return self.tool_choice

    def requested_max_tokens(self) -> int | None:
        # OpenAI deprecated max_tokens for max_completion_tokens; the newer field wins.
        return self.max_completion_tokens or self.max_tokens

    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_SamplingFields):
    prompt: PromptInput
    # 0 with ``echo``: score the prompt and generate nothing (vLLM's, for log-likelihoods).
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    # ``echo`` repeats the prompt before the answer, and with ``logprobs`` its tokens'
    # log-probabilities too (the first is null: nothing precedes it).
    echo: bool = False
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _scoring_only_with_echo(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise InvalidRequest(
                "max_tokens 0 generates nothing: it needs `echo` (score the prompt)",
                param="max_tokens",
            )
        _check_prompt_logprobs(self.prompt_logprobs, self.stream)
        return self

    def engine_prompt_logprobs(self) -> int | None:
        """How many top tokens per prompt position the engine scores (vLLM's rule:
        ``prompt_logprobs``, else ``logprobs`` when echoing)."""
        if self.prompt_logprobs is not None:
            return self.prompt_logprobs
        return self.logprobs if self.echo else None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: PromptInput) -> PromptInput:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be empty")
        if isinstance(value, list) and any(isinstance(p, list) and not p for p in value):
            raise ValueError("token-id prompts must not be empty")
        return value


MAX_JUDGMENT_CHARS = 8000


class FeedbackRequest(_Strict):
    """Feedback on one choice of a stored completion: a judgment (CUT), a rating, a label
    (KTO), a scalar reward (Quark) and/or a preference over another completion of the same
    prompt (DPO)."""

    completion_id: str = Field(min_length=1, max_length=64)
    choice_index: int = Field(default=0, ge=0, le=1024)
    judgment: str | None = None
    # -1 / +1 (thumbs) or 1-5 (stars). 1 alone reads as thumbs-up; a 1-star rating says
    # rating_scale "stars".
    rating: Literal[-1, 1, 2, 3, 4, 5] | None = None
    rating_scale: Literal["thumbs", "stars"] | None = None
    label: Literal["desirable", "undesirable"] | None = None
    # An explicit reward, taken as given (ratings and labels map to [0, 1]; exports compare
    # rewards within one pool, so mixing scales there is the sender's choice).
    reward: float | None = Field(default=None, ge=-1e6, le=1e6, allow_inf_nan=False)
    preferred_over: str | None = Field(default=None, min_length=1, max_length=64)
    # Which choice of ``preferred_over`` lost (default 0).
    preferred_over_choice: int | None = Field(default=None, ge=0, le=1024)
    annotator: str | None = Field(default=None, min_length=1, max_length=256)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=256)

    @field_validator("judgment")
    @classmethod
    def _check_judgment(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError("judgment must not be empty")
        if len(value) > MAX_JUDGMENT_CHARS:
            raise ValueError(f"judgment is longer than {MAX_JUDGMENT_CHARS} characters")
        return value

    @model_validator(mode="after")
    def _check_signal(self) -> FeedbackRequest:
        signals = (self.judgment, self.rating, self.label, self.reward, self.preferred_over)
        if all(v is None for v in signals):
            raise ValueError("give at least one of judgment, rating, label, reward, preferred_over")
        if self.rating is None:
            if self.rating_scale is not None:
                raise ValueError("rating_scale needs a rating")
        elif self.rating_scale is None:
            self.rating_scale = "thumbs" if self.rating in (-1, 1) else "stars"
        elif self.rating_scale == "thumbs" and self.rating not in (-1, 1):
            raise ValueError("a thumbs rating is -1 or 1")
        elif self.rating_scale == "stars" and self.rating < 1:
            raise ValueError("a stars rating is 1 to 5")
        return self


class FeedbackPublic(BaseModel):
    id: str
    object: Literal["feedback"] = "feedback"
    created_at: float
    completion_id: str
    choice_index: int
    model: str
    judgment: str | None
    rating: int | None
    rating_scale: str | None
    label: str | None
    preferred_over: str | None
    preferred_over_choice: int | None = None
    annotator: str | None
    key_id: str  # which API key sent it (its id, never the key)
    reward: float | None = None  # the explicit reward, as sent (None: none was)
    reviewed: bool


class FeedbackList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FeedbackPublic]
    has_more: bool
    next_cursor: str | None


class ModelFeedbackCounts(BaseModel):
    model: str
    total: int
    desirable: int
    undesirable: int
    neutral: int
    judgments: int
    preferences: int


class FeedbackSummary(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelFeedbackCounts]


class ChatCompletionUpdate(_Strict):
    """``POST /v1/chat/completions/{id}``: the new metadata, replacing the old (null: none)."""

    metadata: Metadata | None


class StoredChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    prompt_text: str | None = None  # this choice's own prompt (several prompts)
    token_ids: list[int] | None = None  # as the engine produced them
    prompt_token_ids: list[int] | None = None  # this choice's own prompt (several prompts)


class StoredCompletion(BaseModel):
    id: str
    object: Literal["stored_completion"] = "stored_completion"
    created_at: float
    endpoint: str
    model: str
    family: str
    template_fingerprint: str
    request: Any
    prompt_text: str
    prompt_token_ids: list[int] | None = None  # as the engine received them
    sampling: dict[str, Any]
    choices: list[StoredChoice]
    usage: Usage
    latency_ms: float
    status: str
    user: str | None
    key_id: str | None
    metadata: dict[str, str]
    request_id: str | None = None  # the x-request-id it was served under
    feedback: list[FeedbackPublic]


# ---- responses -------------------------------------------------------------------------


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprobOut]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = Field(default=None, exclude_if=lambda v: not v)


def _unless_requested(value: object) -> bool:
    return value is None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None
    token_ids: list[int] | None = Field(default=None, exclude_if=_unless_requested)


class PromptTokenLogprob(BaseModel):
    """vLLM's ``Logprob`` as its server sends it."""

    logprob: float
    rank: int | None
    decoded_token: str


# Per prompt token (the first: null): {token id: its log-probability}, the prompt's own
# token first, then the k most likely. Sent only when requested.
PromptLogprobsOut = list[dict[str, PromptTokenLogprob] | None]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobsOut | None = Field(default=None, exclude_if=_unless_requested)
    prompt_token_ids: list[int] | None = Field(default=None, exclude_if=_unless_requested)


# ---- OpenAI's Stored Completions (``/v1/chat/completions/{id}`` …) ---------------------


class StoredChatCompletion(ChatCompletion):
    metadata: dict[str, str]


class StoredChatCompletionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[StoredChatCompletion]
    first_id: str | None
    last_id: str | None
    has_more: bool


class StoredMessage(BaseModel):
    id: str  # "<completion id>-<index in the request>"
    role: str
    content: str | None  # None: an assistant's tool calls without text
    name: str | None = None
    content_parts: list[TextPart] | None = None  # when the message was sent as parts
    tool_calls: list[ToolCallOut] | None = Field(default=None, exclude_if=lambda v: not v)
    tool_call_id: str | None = Field(default=None, exclude_if=_unless_requested)


class StoredMessageList(BaseModel):
    object: Literal["list"] = "list"
    data: list[StoredMessage]
    first_id: str | None
    last_id: str | None
    has_more: bool


class ChatCompletionDeleted(BaseModel):
    id: str
    object: Literal["chat.completion.deleted"] = "chat.completion.deleted"
    deleted: bool
    # What derived from it and went with it: unreviewed feedback rows (people's pending
    # judgments, AI judges' verdicts) and AI judges' calls.
    deleted_with_it: dict[str, int] = Field(default_factory=dict)


class FunctionCallDelta(BaseModel):
    name: str | None = Field(default=None, exclude_if=_unless_requested)
    arguments: str | None = Field(default=None, exclude_if=_unless_requested)


class ToolCallDeltaOut(BaseModel):
    index: int
    id: str | None = Field(default=None, exclude_if=_unless_requested)
    type: Literal["function"] | None = Field(default=None, exclude_if=_unless_requested)
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDeltaOut] | None = Field(default=None, exclude_if=lambda v: not v)


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = Field(default=None, exclude_if=_unless_requested)


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    prompt_token_ids: list[int] | None = Field(default=None, exclude_if=_unless_requested)


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None
    prompt_logprobs: PromptLogprobsOut | None = Field(default=None, exclude_if=_unless_requested)
    prompt_token_ids: list[int] | None = Field(default=None, exclude_if=_unless_requested)
    token_ids: list[int] | None = Field(default=None, exclude_if=_unless_requested)


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "aligngate"
    root: str
    max_model_len: int
    family: str
    template: str
    template_fingerprint: str
    # What a left-out sampling field becomes, and from where: {field: {value, from}}, "from"
    # being "models file", the generation_config.json path or "family".
    sampling_defaults: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # An adapter: the base model it runs on, and its metadata (method, data, hyper-parameters).
    parent: str | None = None
    adapter: dict[str, Any] | None = None
    # An alias (``NAME@latest``): the version it serves now.
    alias_of: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class RenderRequest(_Strict):
    """``messages`` (as for chat) or ``prompt`` (as for completions), not both."""

    model: str
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    prompt: str | None = None
    quantile: int | None = Field(default=None, ge=0, le=255)
    # With `messages`: tools, as a chat request sends them, for a template that takes them.
    tools: list[ToolDefinition] | None = Field(default=None, max_length=MAX_TOOLS)


class RenderResponse(BaseModel):
    model: str
    family: str
    template: str
    template_fingerprint: str
    text: str
    token_ids: list[int]
    tokens: list[str]
    stop: list[str]


# ---- OpenAI's Responses API (``/v1/responses``): text in, text out, no hosted tools ------


class ResponseInputText(_Strict):
    type: Literal["input_text", "output_text", "text"]
    text: str
    annotations: list[Any] | None = None  # an earlier answer's output_text, sent back


class ResponseInputMessage(_StorableText):
    """A message item: OpenAI's ``{type: message, role, content}`` (``type`` optional)."""

    model_config = ConfigDict(extra="ignore")  # an earlier output's id and status

    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ResponseInputText]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponsesRequest(_SamplingFields):
    """``POST /v1/responses``. The sampling fields are chat's (``n`` stays 1); the
    Responses names map onto them: ``max_output_tokens`` is ``max_tokens``,
    ``instructions`` a system message before ``input``."""

    input: str | list[ResponseInputMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    previous_response_id: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    truncation: Literal["disabled", "auto"] | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None

    @model_validator(mode="after")
    def _text_in_text_out(self) -> ResponsesRequest:
        if self.n != 1:
            raise InvalidRequest("The Responses API gives one answer (`n` 1).", param="n")
        if self.tools:
            raise InvalidRequest(
                "Tools (hosted or function) are not served by this gateway's Responses API.",
                param="tools",
            )
        if self.tool_choice not in (None, "none", "auto"):
            raise InvalidRequest("Tools are not served by this gateway.", param="tool_choice")
        if self.previous_response_id is not None:
            raise InvalidRequest(
                "`previous_response_id` is not supported: send the conversation as `input`.",
                param="previous_response_id",
            )
        fmt = (self.text or {}).get("format") or {"type": "text"}
        if fmt.get("type") != "text":
            raise InvalidRequest(
                "Only text output is served on /v1/responses (use response_format on chat).",
                param="text",
            )
        if self.truncation == "auto":
            raise InvalidRequest(
                "prompts are never truncated: a long one is a 400", param="truncation"
            )
        if self.reasoning and self.reasoning.get("effort") is not None:
            raise InvalidRequest("Reasoning options are not supported.", param="reasoning")
        texts = [self.instructions or ""] + (
            [self.input] if isinstance(self.input, str) else [m.text() for m in self.input]
        )
        if any(len(t) > MAX_MESSAGE_CHARS for t in texts):
            raise InvalidRequest(
                f"a message is longer than {MAX_MESSAGE_CHARS} characters", param="input"
            )
        return self

    def messages(self) -> list[ChatMessage]:
        """``instructions`` and ``input`` as chat messages (checked as chat checks them)."""
        system = []
        if self.instructions:
            system = [ChatMessage(role="system", content=self.instructions)]
        if isinstance(self.input, str):
            return [*system, ChatMessage(role="user", content=self.input)]
        return [*system, *(ChatMessage(role=m.role, content=m.text()) for m in self.input)]


class ResponseOutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)


class ResponseOutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[ResponseOutputText]


class ResponseUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: dict[str, int] = Field(default_factory=lambda: {"cached_tokens": 0})
    output_tokens_details: dict[str, int] = Field(default_factory=lambda: {"reasoning_tokens": 0})


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: float
    status: Literal["in_progress", "completed", "incomplete"]
    model: str
    output: list[ResponseOutputMessage]
    usage: ResponseUsage | None = None
    incomplete_details: dict[str, str] | None = None
    error: dict[str, Any] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    parallel_tool_calls: bool = False
    tool_choice: str = "none"
    tools: list[Any] = Field(default_factory=list)
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    truncation: str = "disabled"
    previous_response_id: str | None = None
    store: bool = False
    metadata: dict[str, str] = Field(default_factory=dict)
    user: str | None = None


class TokenizeRequest(_Strict):
    """vLLM's ``POST /tokenize``: a completions ``prompt`` or chat ``messages``, not both.
    Fields vLLM takes that change the rendering are accepted and checked by the route
    (``routes.tokenize``): those it cannot honour are refused by name."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    # vLLM's defaults: specials (BOS) added to a text prompt, not on top of a chat template.
    add_special_tokens: bool | None = None
    return_token_strs: bool | None = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: TemplateKwargs = Field(default=None, max_length=32)
    # With `messages`: tools, as chat takes them, for a template that takes them.
    tools: list[ToolDefinition] | None = Field(default=None, max_length=MAX_TOOLS)
    quantile: int | None = Field(default=None, ge=0, le=255)


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0, le=2**63 - 1)]]


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class AdapterLoadRequest(_StorableText):
    """``POST /admin/adapters``: serve an adapter folder under its own model name."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
    # Relative to the adapters root; default: the name.
    path: str | None = Field(default=None, max_length=1024)
    # The served model to run it on; default: the one its metadata names, else the only
    # model served with LoRA support.
    base: str | None = Field(default=None, max_length=128)


class Hyperparameters(_StorableText):
    """Training settings of an online iteration: any field of the method's config (shared:
    LoRA, schedule, batch, length; per method: CUT's threshold, KTO's and DPO's beta, Quark's
    coefficients). A field left out keeps the method's default, the same one ``aligngate
    train`` uses (``server/training``); a field of another method is refused."""

    model_config = ConfigDict(extra="forbid")

    # shared by every method
    lora_r: Literal[1, 8, 16, 32, 64] | None = None
    lora_alpha: int | None = Field(default=None, ge=1, le=1024)
    lora_dropout: float | None = Field(default=None, ge=0, lt=1)
    learning_rate: float | None = Field(default=None, gt=0, le=1)
    warmup_steps: int | None = Field(default=None, ge=0, le=100_000)
    warmup_ratio: float | None = Field(default=None, ge=0, le=1)
    batch_size: int | None = Field(default=None, ge=1, le=1024)
    micro_batch_size: int | None = Field(default=None, ge=1, le=1024)
    epochs: int | None = Field(default=None, ge=1, le=100)
    max_steps: int | None = Field(default=None, ge=1, le=1_000_000)
    cutoff: int | None = Field(default=None, ge=16, le=131_072)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    dtype: Literal["auto", "float32", "bfloat16"] | None = None  # auto: bf16 on GPUs
    threads: int | None = Field(default=None, ge=1, le=256)
    # cut
    threshold: float | None = Field(default=None, gt=0, le=100)
    weight_unlike: float | None = Field(default=None, ge=0, le=100)
    downsample: float | None = Field(default=None, ge=-1, le=100)
    # kto, dpo
    beta: float | None = Field(default=None, gt=0, le=100)
    desirable_weight: float | None = Field(default=None, gt=0, le=100)
    undesirable_weight: float | None = Field(default=None, gt=0, le=100)
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust", "bco_pair", "apo_zero"] | None = None
    # quark
    kl_coef: float | None = Field(default=None, ge=0, le=100)
    entropy_coef: float | None = Field(default=None, ge=0, le=100)

    def given(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class GateRequest(_Strict):
    """After training: does the candidate beat the version ``NAME@latest`` serves?"""

    enabled: bool = True
    # A pairwise judge of the models file (default: its only pairwise judge).
    judge: str | None = Field(default=None, max_length=64)
    # Instructions (a JSON list or JSONL of {instruction}): default ALIGNGATE_GATE_INSTRUCTIONS,
    # else the official AlpacaEval set.
    instructions: str | None = Field(default=None, max_length=4096)
    # Items judged. Default: the fewest with ≥ 80 % power to promote a candidate whose true
    # win rate is 0.60 with 30 % ties (README "The promotion gate").
    size: int = Field(default=116, ge=1, le=805)
    max_tokens: int = Field(default=256, ge=1, le=8192)
    # superiority: promote only if the one-sided 95 % lower bound of the win rate (ties
    # half) is above 0.5; non-inferiority: above 0.5 − margin (refresh training).
    mode: Literal["superiority", "non-inferiority"] = "superiority"
    margin: float = Field(default=0.05, ge=0, le=0.5)
    # A judge served by this gateway from the candidate's or the incumbent's base would
    # judge itself (models prefer their own answers): refused unless this is set.
    allow_self_judging: bool = False
    # Decide on the length-controlled win rate (alpaca_eval's GLM) instead of the raw one.
    length_controlled: bool = False
    promote: bool = True  # False: judge and report only


class AlignRequest(_Strict):
    """``POST /admin/align``: one online iteration on a served model's judgments."""

    model: str = Field(max_length=128)
    # ISO-8601 or epoch seconds; default: where the previous iteration stopped.
    since: str | None = Field(default=None, max_length=64)
    # How to train (default: the model's `online.method` in the models file, else its
    # family's: cut, kto, dpo or quark).
    method: Literal["cut", "kto", "dpo", "quark"] | None = None
    # The fewest usable pieces of the method's feedback (judged responses, labelled
    # responses, pairs, scored generations) to train on; default: the method's.
    min_examples: int | None = Field(default=None, ge=1, le=1_000_000)
    min_judged: int | None = Field(default=None, ge=1, le=1_000_000)  # older name of it
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    # Poisoning guard (OWASP LLM04): only reviewed judgments train, or those of these
    # annotators (added to ALIGNGATE_TRUSTED_ANNOTATORS) — unless include_unreviewed.
    # API key ids whose judgments train unreviewed (besides ALIGNGATE_TRUSTED_ANNOTATORS and
    # the keys file's `trusted` keys); the name is kept from when it matched annotator labels.
    trusted_annotators: list[str] = Field(default_factory=list, max_length=1000)
    include_unreviewed: bool = False
    gate: GateRequest = Field(default_factory=GateRequest)


class PromoteRequest(_Strict):
    """``POST /admin/promote``: point ``NAME@latest`` at a version (promote or roll back)."""

    alias: str = Field(min_length=1, max_length=160)
    version: str = Field(min_length=1, max_length=128)
    reason: str = Field(default="", max_length=1000)


class ReviewRequest(_Strict):
    """``POST /admin/feedback/review``: mark feedback as reviewed (or take the mark back)."""

    ids: list[str] = Field(min_length=1, max_length=1000)
    reviewed: bool = True


# ---- the arena and the leaderboard ---------------------------------------------------------

Winner = Literal["a", "b", "tie", "both_bad"]
# "human" (arena votes) or "judge:<name>" (an AI judge's pairwise verdicts).
SOURCE_PATTERN = r"^(human|all|judge:[A-Za-z0-9][A-Za-z0-9._:/-]{0,100})$"


class BattleRequest(_Strict):
    """``POST /v1/arena/battles``: one conversation, answered by two served models drawn at
    random (or the two ``models`` named), shown as A and B with the names hidden."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    # Pin the pair (their A/B order is still drawn at random); default: two served models.
    models: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        default=None, min_length=2, max_length=2
    )
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    user: str | None = Field(default=None, max_length=256)

    @field_validator("models")
    @classmethod
    def _two_different(cls, models: list[str] | None) -> list[str] | None:
        if models is not None and models[0] == models[1]:
            raise ValueError("a battle needs two different models")
        return models


class BattleAnswer(BaseModel):
    content: str | None  # None: the answer's completion is not stored (a judge's battle)
    finish_reason: str | None = None
    # Hidden (None) until the battle is voted on: the completion id would name the model too.
    model: str | None = None
    completion_id: str | None = None


class BattlePublic(BaseModel):
    id: str
    object: Literal["arena.battle"] = "arena.battle"
    created_at: float
    source: str
    status: Literal["open", "decided"]
    a: BattleAnswer
    b: BattleAnswer
    winner: Winner | None = None
    voted_at: float | None = None
    # A decisive vote's preference feedback (the DPO pair), when one was stored ...
    preference_id: str | None = None
    # ... and why not, when a decisive vote stored none.
    preference_note: str | None = None


class VoteRequest(_Strict):
    """``POST /v1/arena/battles/{id}/vote``: A better, B better, a tie, or both bad."""

    winner: Winner
    annotator: str | None = Field(default=None, min_length=1, max_length=256)


class LeaderboardRow(BaseModel):
    rank: int  # 1 + the number of models whose interval lies wholly above this one's
    model: str
    rating: float
    low: float | None  # the bootstrap interval; None where the rating has no finite MLE
    high: float | None
    battles: int
    wins: int
    losses: int
    ties: int  # ties and both-bad votes
    bounded: bool
    # The rank's 95 % bootstrap interval (1 = best; Chatbot Arena's "rank (CI)").
    rank_low: int | None = None
    rank_high: int | None = None


class Leaderboard(BaseModel):
    object: Literal["leaderboard"] = "leaderboard"
    # The source rated (`human`, `judge:NAME`), or `all` when asked to mix them.
    source: str
    sources: list[str]  # the sources that decided battles (the filter's choices)
    anchor: str | None
    anchor_rating: float
    scale: float
    base: float
    battles: int
    resamples: int
    confidence: float
    data: list[LeaderboardRow]
    # win_rates[row][col]: the share of row's battles against col that row won (ties half).
    win_rates: dict[str, dict[str, float | None]]


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 404, 500, 503)
}


StoredCompletion.model_rebuild()
