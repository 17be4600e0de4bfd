"""CUT training examples: records in the CUT repo's format → token ids and response spans.

Reads the CUT repo's `data/iter/train-alpaca-sample-iter*.json` layout, which is also what
`aligngate export --format cut` writes: a JSON list of
`{id, instruction, input, output, judgment | null, score?}`, plus what the gateway adds:
`messages` (the whole conversation as served: system message, earlier turns) and
`prompt_token_ids` / `output_token_ids` (the ids the engine received and produced).
With ids, the example is token-exact: the plain sequence is the served prompt's ids and the
response is the produced ids, never re-tokenized text; the judgment prompt (A) is the
family's `judge` template over the same conversation, followed by the same response ids.
Without them (the CUT repo's files), every prompt comes from the model's own `Renderer`:
the plain prompt (B) is exactly what a user's request renders to.

Owns: parsing, downsampling, tokenizing and truncating examples.
Does not know: the loss, models or optimizers.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.models.render import Message, RenderedPrompt, Renderer

# A score at or above this marks a response judged fine (the CUT repo's rule).
FINE_SCORE = 7


class CutDataError(ValueError):
    """A training file that is not in the CUT format."""


@dataclass(frozen=True, slots=True)
class CutRecord:
    instruction: str
    output: str
    judgment: str | None  # None: judged fine
    # The conversation as served (None: one user turn, ``instruction``).
    messages: tuple[Message, ...] | None = None
    # Token-exact: the served prompt's ids (BOS included) and the produced ids.
    prompt_ids: tuple[int, ...] | None = None
    output_ids: tuple[int, ...] | None = None

    def conversation(self) -> list[Message]:
        if self.messages is not None:
            return list(self.messages)
        return [Message("user", self.instruction)]

    @property
    def judged(self) -> bool:
        return self.judgment is not None


@dataclass(frozen=True, slots=True)
class CutExample:
    """Token ids of one training example. ``judge_ids`` is None for a fine response.
    The response occupies the last ``response_len`` ids of each sequence."""

    plain_ids: list[int]
    judge_ids: list[int] | None
    response_len: int

    @property
    def tokens(self) -> int:
        return len(self.plain_ids) + len(self.judge_ids or ())


@dataclass(frozen=True, slots=True)
class CutDataset:
    examples: list[CutExample]
    judged: int
    fine: int
    fine_dropped: int  # by downsampling
    skipped: int  # empty, or a response that tokenizes differently under the two prompts
    sha256: str


def parse_records(raw: Any) -> list[CutRecord]:
    if not isinstance(raw, list):
        raise CutDataError("a CUT training file is a JSON list of records")
    records = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise CutDataError(f"record {i} is not an object")
        instruction, output = item.get("instruction"), item.get("output")
        if not isinstance(instruction, str) or not isinstance(output, str):
            raise CutDataError(f"record {i}: `instruction` and `output` must be strings")
        extra = item.get("input") or ""
        if not isinstance(extra, str):
            raise CutDataError(f"record {i}: `input` must be a string")
        judgment = item.get("judgment")
        if judgment is not None and not isinstance(judgment, str):
            raise CutDataError(f"record {i}: `judgment` must be a string or null")
        score = item.get("score")
        if isinstance(score, int | float) and score >= FINE_SCORE:
            judgment = None
        if judgment is not None and not judgment.strip():
            judgment = None
        prompt_ids = _ids(item, "prompt_token_ids", i)
        output_ids = _ids(item, "output_token_ids", i)
        if (prompt_ids is None) != (output_ids is None):
            raise CutDataError(
                f"record {i}: `prompt_token_ids` and `output_token_ids` come together"
            )
        records.append(
            CutRecord(
                instruction=f"{instruction}\n{extra}" if extra else instruction,
                output=output,
                judgment=judgment,
                messages=_messages(item, i),
                prompt_ids=prompt_ids,
                output_ids=output_ids,
            )
        )
    return records


def _ids(item: dict[str, Any], key: str, i: int) -> tuple[int, ...] | None:
    value = item.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value
    ):
        raise CutDataError(f"record {i}: `{key}` must be a list of token ids")
    return tuple(value)


def _messages(item: dict[str, Any], i: int) -> tuple[Message, ...] | None:
    value = item.get("messages")
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise CutDataError(f"record {i}: `messages` must be a non-empty list")
    out = []
    for m in value:
        if not (
            isinstance(m, dict)
            and m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str)
        ):
            raise CutDataError(
                f"record {i}: each message is {{role: system|user|assistant, content: str}}"
            )
        out.append(Message(m["role"], m["content"]))
    return tuple(out)


def read_records(path: Path) -> tuple[list[CutRecord], str]:
    try:
        data = path.read_bytes()
        raw = json.loads(data)
    except (OSError, json.JSONDecodeError) as exc:
        raise CutDataError(f"cannot read CUT training file {path}: {exc}") from exc
    return parse_records(raw), hashlib.sha256(data).hexdigest()


def downsample(records: list[CutRecord], ratio: float, seed: int) -> tuple[list[CutRecord], int]:
    """Keep every judged response and int(n_judged × ratio) of the fine ones (CUT's rule).
    A negative ratio keeps every fine response. Returns the kept records and the dropped count."""
    judged = [r for r in records if r.judged]
    fine = [r for r in records if not r.judged]
    if ratio < 0:
        return records, 0
    keep = min(len(fine), int(len(judged) * ratio))
    kept_fine = random.Random(seed).sample(fine, keep)
    kept = judged + kept_fine
    random.Random(seed + 1).shuffle(kept)
    return kept, len(fine) - keep


def _response_ids(renderer: Renderer, prompt: RenderedPrompt, output: str) -> list[int]:
    """The response's ids as a trainer that tokenizes prompt + response together gets them
    (so a word boundary at the seam tokenizes as it would in the full text), falling back to
    tokenizing the response alone when the prompt was tokenized with guarded user text."""
    tok = renderer.tokenizer
    body = prompt.token_ids
    if body[:1] == [tok.bos_token_id] and renderer.spec.bos == "add":
        body = body[1:]
    if renderer.has_control_text(output):
        ids = renderer.plain_ids(output)
    else:
        joint = list(tok(prompt.text + output, add_special_tokens=False)["input_ids"])
        ids = joint[len(body) :] if joint[: len(body)] == body else renderer.plain_ids(output)
    eos = tok.eos_token_id
    return [*ids, eos] if eos is not None else ids


def _truncate_left(ids: list[int], cutoff: int) -> list[int]:
    return ids[-cutoff:] if len(ids) > cutoff else ids


def build_example(renderer: Renderer, record: CutRecord, cutoff: int) -> CutExample | None:
    messages = record.conversation()
    if record.prompt_ids is not None and record.output_ids is not None:
        # Token-exact: the sequence the model was served and produced, as it was.
        prompt_ids = list(record.prompt_ids)
        response = list(record.output_ids)
        if not [t for t in response if t != renderer.tokenizer.eos_token_id]:
            return None  # nothing but EOS
    else:
        plain = renderer.render_chat(messages)
        prompt_ids = plain.token_ids
        response = _response_ids(renderer, plain, record.output)
        if len(response) < 2:  # nothing but EOS
            return None
    judge_ids = None
    if record.judgment is not None:
        judge = renderer.render_extra("judge", messages, judgment=record.judgment)
        if record.output_ids is None and _response_ids(renderer, judge, record.output) != response:
            return None  # CUT needs the same response tokens under both prompts
        judge_ids = _truncate_left(judge.token_ids + response, cutoff)
    plain_ids = _truncate_left(prompt_ids + response, cutoff)
    # Over-long sequences lose prompt tokens first (cut from the left); at least one
    # prompt token must remain to predict the first response token from.
    response_len = min(len(response), len(plain_ids) - 1, len(judge_ids or plain_ids) - 1)
    return CutExample(plain_ids=plain_ids, judge_ids=judge_ids, response_len=response_len)


def build_dataset(
    renderer: Renderer,
    records: list[CutRecord],
    *,
    sha256: str,
    downsample_ratio: float,
    cutoff: int,
    seed: int,
) -> CutDataset:
    if "judge" not in renderer.spec.extra_templates:
        raise CutDataError(
            f"the {renderer.family} family has no judgment template (`judge` in "
            "templates/families.yaml); CUT cannot train it"
        )
    kept, dropped = downsample(records, downsample_ratio, seed)
    examples, skipped = [], 0
    for record in kept:
        example = build_example(renderer, record, cutoff)
        if example is None:
            skipped += 1
        else:
            examples.append(example)
    return CutDataset(
        examples=examples,
        judged=sum(1 for e in examples if e.judge_ids is not None),
        fine=sum(1 for e in examples if e.judge_ids is None),
        fine_dropped=dropped,
        skipped=skipped,
        sha256=sha256,
    )
