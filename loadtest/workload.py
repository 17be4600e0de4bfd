"""Workloads: what to ask and how many tokens to ask for.

AlpacaEval: the 805 instructions, each with the token length of a real reference output for the
same instruction (e.g. the cut-13b checkpoint's), capped by ``max_tokens``. Or a prompts file:
one prompt per line, or JSON lines ``{"prompt": ..., "max_tokens": ...}``.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# Without a tokenizer, English text averages about 4 characters per token (BPE tokenizers).
CHARS_PER_TOKEN = 4.0


class WorkloadError(ValueError):
    """A workload file that cannot be used."""


@dataclass(frozen=True, slots=True)
class Item:
    prompt: str
    max_tokens: int


def token_counter(tokenizer_path: str | None) -> Callable[[str], int]:
    """Count tokens with the served model's tokenizer, or estimate when none is given."""
    if tokenizer_path is None:
        return lambda text: max(1, math.ceil(len(text) / CHARS_PER_TOKEN))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _read_json_list(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WorkloadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        raise WorkloadError(f"{path}: expected a JSON list of objects")
    return data


def alpaca_eval(
    eval_set: Path,
    reference: Path,
    max_tokens: int,
    count_tokens: Callable[[str], int],
) -> list[Item]:
    """Instructions in the eval set's order, each asking for its reference output's length."""
    instructions = _read_json_list(eval_set)
    outputs = {row["instruction"]: row.get("output", "") for row in _read_json_list(reference)}
    items = []
    for row in instructions:
        instruction = row["instruction"]
        if instruction not in outputs:
            raise WorkloadError(f"{reference} has no output for instruction {instruction[:60]!r}")
        length = count_tokens(outputs[instruction] or " ")
        items.append(Item(instruction, max(1, min(length, max_tokens))))
    return items


def prompts_file(path: Path, max_tokens: int) -> list[Item]:
    """One prompt per line, or JSON lines with ``prompt`` and optional ``max_tokens``."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise WorkloadError(f"cannot read {path}: {exc}") from exc
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                row = json.loads(line)
                prompt = str(row["prompt"])
                wanted = int(row.get("max_tokens", max_tokens))
            except (ValueError, KeyError, TypeError) as exc:
                raise WorkloadError(f"{path}:{number}: {exc}") from exc
            items.append(Item(prompt, max(1, min(wanted, max_tokens))))
        else:
            items.append(Item(line, max_tokens))
    if not items:
        raise WorkloadError(f"{path} holds no prompts")
    return items


def fixed_length(items: Sequence[Item], max_tokens: int) -> list[Item]:
    """The same prompts, each asking for exactly ``max_tokens`` (the overhead probe uses 1)."""
    return [Item(item.prompt, max_tokens) for item in items]


def request_stream(items: Sequence[Item], seed: int) -> Iterator[Item]:
    """An endless, seeded shuffle of the items (reshuffled each pass), identical per seed."""
    if not items:
        raise WorkloadError("the workload is empty")
    rng = random.Random(seed)
    while True:
        order = list(items)
        rng.shuffle(order)
        yield from order
