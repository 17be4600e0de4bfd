"""Training files from stored feedback, in the formats the methods' own trainers read.

- ``cut``: the CUT repo's data/iter layout, ``{id, instruction, input, output, judgment}``
  (judgment null for a response judged fine).
- ``kto``: HALOs' ``binary_feedback`` records; ``trl-kto``: TRL's ``{prompt, completion, label}``.
- ``dpo``: TRL's ``{prompt, chosen, rejected}``.
- ``quark``: ``{prompt, generation, reward, quantile_token}`` with rewards mapped to K
  quantiles per prompt.
Prompts that are text are the exact prompt the model was served with (rendered by the same
renderer at serving time and stored with the completion).

Owns: the mapping from (feedback, completion) rows to records. Does not know SQL.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from server.store import CompletionRecord, FeedbackRow

QUANTILE_TOKENS = [f"_QUANTILE_TOKEN_{k}_" for k in range(5)]

Rows = list[FeedbackRow]
Records = dict[str, CompletionRecord]


def instruction_of(record: CompletionRecord, choice_index: int = 0) -> str:
    """The user's instruction: the last user message of a chat, or the completions prompt."""
    if record.endpoint == "chat":
        for message in reversed(record.request):
            if message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, list):
                    return "".join(p.get("text", "") for p in content)
                return str(content)
    choice = record.choices[choice_index]
    if choice.prompt_text is not None:
        return choice.prompt_text
    return record.request if isinstance(record.request, str) else record.prompt_text


def messages_of(record: CompletionRecord) -> list[dict[str, str]]:
    if record.endpoint == "chat":
        out = []
        for m in record.request:
            content = m.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content)
            role = "system" if m.get("role") == "developer" else m.get("role")
            out.append({"role": role, "content": str(content)})
        return out
    return [{"role": "user", "content": instruction_of(record)}]


def output_of(record: CompletionRecord, choice_index: int) -> str:
    return record.choices[choice_index].text


def to_cut(rows: Rows, records: Records) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for fb in rows:
        record = records[fb.completion_id]
        polarity = fb.polarity()
        if polarity is True:
            judgment = None  # judged fine: plain likelihood in CUT
        elif fb.judgment:
            judgment = fb.judgment
        else:
            continue  # a thumbs-down without words gives CUT nothing to learn from
        out.append(
            {
                "id": len(out),
                "instruction": instruction_of(record, fb.choice_index),
                "input": "",
                "output": output_of(record, fb.choice_index),
                "judgment": judgment,
            }
        )
    return out


def _prompt_id(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


def _binary(rows: Rows, records: Records) -> list[tuple[FeedbackRow, CompletionRecord, bool]]:
    """Feedback with a desirable/undesirable verdict (KTO's unpaired signal)."""
    out = []
    for fb in rows:
        polarity = fb.polarity()
        if polarity is not None:
            out.append((fb, records[fb.completion_id], polarity))
    return out


def to_kto(rows: Rows, records: Records) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for fb, record, polarity in _binary(rows, records):
        reward = fb.reward()
        out.append(
            {
                "prompt_id": _prompt_id(record.prompt_of(fb.choice_index)),
                "prompt": messages_of(record),
                "output": [{"role": "assistant", "content": output_of(record, fb.choice_index)}],
                "label": 1 if polarity else 0,
                "reward": float(reward if reward is not None else int(polarity)),
                "type": "binary_feedback",
                "split": "train",
            }
        )
    return out


def to_trl_kto(rows: Rows, records: Records) -> list[dict[str, Any]]:
    return [
        {
            "prompt": record.prompt_of(fb.choice_index),
            "completion": output_of(record, fb.choice_index),
            "label": polarity,
        }
        for fb, record, polarity in _binary(rows, records)
    ]


def to_dpo(rows: Rows, records: Records) -> list[dict[str, Any]]:
    """Pairs from ``preferred_over``, and from two differently rated choices of one request."""
    out: list[dict[str, Any]] = []
    for fb in rows:
        if fb.preferred_over is None:
            continue
        chosen, rejected = records[fb.completion_id], records[fb.preferred_over]
        out.append(
            {
                "prompt": chosen.prompt_of(fb.choice_index),
                "chosen": output_of(chosen, fb.choice_index),
                "rejected": output_of(rejected, 0),
            }
        )
    latest: dict[tuple[str, int], float] = {}
    for fb in rows:
        reward = fb.reward()
        if reward is not None and fb.preferred_over is None:
            latest[(fb.completion_id, fb.choice_index)] = reward
    by_completion: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for (completion_id, index), reward in latest.items():
        by_completion[completion_id].append((reward, index))
    for completion_id, scored in by_completion.items():
        if len(scored) < 2:
            continue
        best, worst = max(scored), min(scored)
        if best[0] == worst[0]:
            continue
        record = records[completion_id]
        out.append(
            {
                "prompt": record.prompt_of(best[1]),
                "chosen": output_of(record, best[1]),
                "rejected": output_of(record, worst[1]),
            }
        )
    return out


def assign_quantiles(rewards: list[float], k: int = len(QUANTILE_TOKENS)) -> list[int]:
    """Quantile of each reward among one prompt's generations: sort descending, split into k
    equal groups, the remainder to the last. With fewer than k generations each gets its
    rank (best 0)."""
    order = sorted(range(len(rewards)), key=lambda i: rewards[i], reverse=True)
    size = len(rewards) // k
    quantiles = [0] * len(rewards)
    for rank, i in enumerate(order):
        quantiles[i] = min(rank // size, k - 1) if size else min(rank, k - 1)
    return quantiles


def to_quark(rows: Rows, records: Records) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for fb in rows:
        reward = fb.reward()
        if reward is None:
            continue
        record = records[fb.completion_id]
        items.append(
            {
                "prompt": instruction_of(record, fb.choice_index),
                "generation": output_of(record, fb.choice_index),
                "reward": reward,
            }
        )
    by_prompt: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for item in items:
        by_prompt[item["prompt"]].append(item)
    for group in by_prompt.values():
        for item, q in zip(group, assign_quantiles([g["reward"] for g in group]), strict=True):
            item["quantile_token"] = QUANTILE_TOKENS[q]
    return items


FORMATS: dict[str, Callable[[Rows, Records], list[dict[str, Any]]]] = {
    "cut": to_cut,
    "kto": to_kto,
    "trl-kto": to_trl_kto,
    "dpo": to_dpo,
    "quark": to_quark,
}
