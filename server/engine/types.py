"""Plain data the engine speaks: sampling settings in, token deltas out.

Owns: the engine's vocabulary, free of vLLM types, so callers never import vllm.
Does not know: templates, tokenizers or HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class StructuredSpec:
    """Constrained decoding (vLLM's structured outputs): exactly one of these is set."""

    regex: str | None = None
    choice: tuple[str, ...] | None = None
    json_schema: str | None = None  # a JSON Schema, as JSON text
    json_object: bool = False  # any JSON object


@dataclass(frozen=True, slots=True)
class SamplingSpec:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    # None: no log-probabilities; k >= 0: the sampled token's plus the k most likely.
    logprobs: int | None = None
    # The same for each prompt token (as vLLM's ``prompt_logprobs``; the first has none).
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # (token id, bias) pairs added to the logits (OpenAI's logit_bias).
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Batch work needs no per-token deltas: the engine then sends each request's output
    # once, which spares the front end (which shares the CPU with the engine) that work.
    final_only: bool = False
    structured: StructuredSpec | None = None


@dataclass(frozen=True, slots=True)
class AdapterRef:
    """A LoRA adapter as the engine knows it: a unique name, a positive integer id, a folder."""

    name: str
    id: int
    path: str


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token: str
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class RankedLogprob:
    """One token's log-probability at a prompt position, with its rank in the vocabulary
    (1: the most likely)."""

    token_id: int
    token: str
    logprob: float
    rank: int


# Per prompt token: None for the first (nothing precedes it), else the prompt's own token
# first, then the k most likely (vLLM's ``prompt_logprobs``, in its order).
PromptLogprobs = list[tuple[RankedLogprob, ...] | None]


@dataclass(slots=True)
class ChoiceDelta:
    """What one choice produced since the previous step."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    # The prompt's log-probabilities, on the deltas of the step that scored them (once).
    prompt_logprobs: PromptLogprobs | None = None


@dataclass(frozen=True, slots=True)
class Replica:
    """Which copy of a model's engine took a request (a cluster backend's replica), and that
    engine's queue when it did: its scheduler's last counts, and the requests it holds."""

    id: str
    running: int = 0
    waiting: int = 0
    unfinished: int = 0


@dataclass(slots=True)
class EngineStats:
    running: int = 0
    waiting: int = 0
    extra: dict[str, float] = field(default_factory=dict)


class SamplingRejected(ValueError):
    """vLLM refused a request's sampling parameters or input (the request's fault)."""
