"""CUT training examples: records in the CUT repo's format → token ids and response spans.

Reads the CUT repo's `data/iter/train-alpaca-sample-iter*.json` layout, which is also what
`aligngate export --format cut` writes: a JSON list of
`{id, instruction, input, output, judgment | null, score?}`.
Every prompt comes from the model's own `Renderer`, the one it is served with: the plain
prompt (B) is exactly what a user's request renders to, the judgment prompt (A) is the
family's `judge` template.

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
        records.append(
            CutRecord(
                instruction=f"{instruction}\n{extra}" if extra else instruction,
                output=output,
                judgment=judgment,
            )
        )
    return records


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
    messages = [Message("user", record.instruction)]
    plain = renderer.render_chat(messages)
    response = _response_ids(renderer, plain, record.output)
    if len(response) < 2:  # nothing but EOS
        return None
    judge_ids = None
    if record.judgment is not None:
        judge = renderer.render_extra("judge", messages, judgment=record.judgment)
        if _response_ids(renderer, judge, record.output) != response:
            return None  # CUT needs the same response tokens under both prompts
        judge_ids = _truncate_left(judge.token_ids + response, cutoff)
    plain_ids = _truncate_left(plain.token_ids + response, cutoff)
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
