"""Training files from stored feedback, in the formats the methods' own trainers read.

- ``cut``: the CUT repo's data/iter layout, ``{id, instruction, input, output, judgment}``
  (judgment null for a response judged fine).
- ``kto``: HALOs' ``binary_feedback`` records; ``trl-kto``: TRL's ``{prompt, completion, label}``.
- ``dpo``: TRL's ``{prompt, chosen, rejected}``.
- ``quark``: ALT's data pool, one object per prompt (the instruction text):
  ``{prompt, generations, rewards, quantile_tokens, quantiles}``, generations best first.
  Rewards are ``FeedbackRow.reward()`` (explicit, score judge, rating or label); quantiles
  follow ``quantiles.py`` (per prompt with at least K generations, else pooled over the
  window; a pool smaller than K gets the worst quantile).
Prompts that are text are the exact prompt the model was served with (rendered by the same
renderer at serving time and stored with the completion), whole conversations included: the
system message and earlier turns. TRL-format prompts (``trl-kto``, ``dpo``) start with the
BOS token's text when the served model received a BOS id (TRL ≥ 0.12 adds no BOS to a
decoder-only prompt; older TRL adds one only if it is missing: either way exactly one).
CUT records also carry the token ids as served (``prompt_token_ids``, ``output_token_ids``),
which CUT training uses instead of re-tokenizing text.

Conflicting verdicts: several verdicts on one choice (a label, a rating, a judgment), or
opposite preferences between two choices, are resolved by one rule — the latest committed
row among those selected wins (the online loop selects only trusted keys' and reviewed
rows, so there it is the latest trusted verdict). ``ExportReport`` counts them.

Owns: the mapping from (feedback, completion) rows to records. Does not know SQL.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from server.feedback.quantiles import quantile_pools
from server.store import CompletionRecord, FeedbackRow
from server.store.holdout import held_out

QUANTILE_TOKENS = [f"_QUANTILE_TOKEN_{k}_" for k in range(5)]

Rows = list[FeedbackRow]
Records = dict[str, CompletionRecord]


def instruction_of(record: CompletionRecord, choice_index: int = 0) -> str:
    """The user's instruction: the last user message of a chat, or the completions prompt."""
    if record.conversation:
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


def messages_of(record: CompletionRecord, choice_index: int = 0) -> list[dict[str, str]]:
    """The conversation as served: system message and earlier turns included."""
    if record.conversation:
        out = []
        for m in record.request:
            content = m.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content)
            role = "system" if m.get("role") == "developer" else m.get("role")
            # An assistant's tool calls without text: its content is none, not "None".
            out.append({"role": role, "content": "" if content is None else str(content)})
        return out
    return [{"role": "user", "content": instruction_of(record, choice_index)}]


def trl_prompt_of(record: CompletionRecord, choice_index: int) -> str:
    """The served prompt's text, with the BOS text when the engine received a BOS id."""
    return (record.prompt_bos or "") + record.prompt_of(choice_index)


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
        choice = record.choices[fb.choice_index]
        item: dict[str, Any] = {
            "id": len(out),
            # The CUT repo's fields (its trainers read only these) ...
            "instruction": instruction_of(record, fb.choice_index),
            "input": "",
            "output": output_of(record, fb.choice_index),
            "judgment": judgment,
            # ... and the prompt as served: the whole conversation, and its token ids.
            "messages": messages_of(record, fb.choice_index),
            "completion_id": record.id,
            "choice_index": fb.choice_index,
        }
        prompt_ids = record.prompt_ids_of(fb.choice_index)
        if prompt_ids is not None and choice.token_ids is not None:
            item["prompt_token_ids"] = prompt_ids
            item["output_token_ids"] = choice.token_ids
            item["finish_reason"] = choice.finish_reason
        out.append(item)
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
                "prompt": messages_of(record, fb.choice_index),
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
            "prompt": trl_prompt_of(record, fb.choice_index),
            "completion": output_of(record, fb.choice_index),
            "label": polarity,
        }
        for fb, record, polarity in _binary(rows, records)
    ]


def to_dpo(rows: Rows, records: Records) -> list[dict[str, Any]]:
    """Pairs from ``preferred_over`` (and ``preferred_over_choice``), and from two differently
    rated choices of one request for one prompt (a request with several prompts never pairs
    one prompt's choice with another's)."""
    return preference_pairs(rows, records) + rated_pairs(rows, records)


def preference_pairs(rows: Rows, records: Records) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for fb in rows:
        if fb.preferred_over is None:
            continue
        chosen, rejected = records[fb.completion_id], records[fb.preferred_over]
        out.append(
            {
                "prompt": trl_prompt_of(chosen, fb.choice_index),
                "chosen": output_of(chosen, fb.choice_index),
                "rejected": output_of(rejected, fb.rejected_choice),
            }
        )
    return out


def rated_pairs(rows: Rows, records: Records) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    latest: dict[tuple[str, int], float] = {}
    for fb in rows:
        reward = fb.reward()
        if reward is not None and fb.preferred_over is None:
            latest[(fb.completion_id, fb.choice_index)] = reward
    by_prompt: dict[tuple[str, str], list[tuple[float, int]]] = defaultdict(list)
    for (completion_id, index), reward in latest.items():
        prompt = records[completion_id].prompt_of(index)
        by_prompt[(completion_id, prompt)].append((reward, index))
    for (completion_id, _), scored in by_prompt.items():
        if len(scored) < 2:
            continue
        best, worst = max(scored), min(scored)
        if best[0] == worst[0]:
            continue
        record = records[completion_id]
        out.append(
            {
                "prompt": trl_prompt_of(record, best[1]),
                "chosen": output_of(record, best[1]),
                "rejected": output_of(record, worst[1]),
            }
        )
    return out


@dataclass(frozen=True)
class _Generation:
    prompt: str
    text: str
    reward: float


def to_quark(rows: Rows, records: Records) -> list[dict[str, Any]]:
    items: list[_Generation] = []
    for fb in rows:
        reward = fb.reward()
        if reward is None:
            continue
        record = records[fb.completion_id]
        prompt = instruction_of(record, fb.choice_index)
        items.append(_Generation(prompt, output_of(record, fb.choice_index), reward))
    by_prompt: dict[str, list[tuple[_Generation, int]]] = defaultdict(list)
    for item, q in zip(items, quantile_pools(items, len(QUANTILE_TOKENS)), strict=True):
        by_prompt[item.prompt].append((item, q))
    out: list[dict[str, Any]] = []
    for prompt, group in by_prompt.items():
        group.sort(key=lambda pair: pair[0].reward, reverse=True)  # stable: ties in commit order
        out.append(
            {
                "prompt": prompt,
                "generations": [item.text for item, _ in group],
                "rewards": [item.reward for item, _ in group],
                "quantile_tokens": [QUANTILE_TOKENS[q] for _, q in group],
                "quantiles": [q for _, q in group],
            }
        )
    return out


@dataclass
class ExportReport:
    feedback_rows: int = 0  # selected by the query
    held_out: int = 0  # rows on held-out completions (``holdout``): never exported
    records: int = 0  # written
    superseded: int = 0  # verdicts or preferences replaced by a later one on the same choice
    conflicts: int = 0  # choices (or pairs) whose verdicts disagreed; the latest won
    # Rows on conversations with tools (``CompletionRecord.uses_tools``): not exported, as
    # the formats hold text turns only.
    with_tools: int = 0

    def public(self) -> dict[str, int]:
        return asdict(self)


def _is_verdict(fb: FeedbackRow) -> bool:
    """A verdict CUT, KTO and rated DPO pairs read: a polarity or a judgment."""
    return fb.polarity() is not None or bool(fb.judgment)


@dataclass(frozen=True)
class Resolved:
    verdicts: Rows  # the latest verdict (polarity or judgment) on each choice
    # The latest row with a reward on each choice (Quark's: a neutral 3 stars or an explicit
    # reward counts here, and never replaces a verdict above).
    rewards: Rows
    preferences: Rows  # the latest preference between each pair of choices
    report: ExportReport


def resolve_conflicts(rows: Rows) -> Resolved:
    """One verdict per choice and one preference per pair of choices: the latest committed
    row wins (``rows`` are in commit order)."""
    verdicts: dict[tuple[str, int], list[FeedbackRow]] = defaultdict(list)
    rewards: dict[tuple[str, int], FeedbackRow] = {}
    preferences: dict[frozenset[tuple[str, int]], list[FeedbackRow]] = defaultdict(list)
    for fb in rows:
        if _is_verdict(fb):
            verdicts[(fb.completion_id, fb.choice_index)].append(fb)
        if fb.reward() is not None and fb.preferred_over is None:
            rewards[(fb.completion_id, fb.choice_index)] = fb
        if fb.preferred_over is not None:
            pair = frozenset(
                {(fb.completion_id, fb.choice_index), (fb.preferred_over, fb.rejected_choice)}
            )
            preferences[pair].append(fb)
    report = ExportReport(feedback_rows=len(rows))
    for group in verdicts.values():
        report.superseded += len(group) - 1
        report.conflicts += len({(fb.polarity(), fb.judgment) for fb in group}) > 1
    for group in preferences.values():
        report.superseded += len(group) - 1
        report.conflicts += len({(fb.completion_id, fb.choice_index) for fb in group}) > 1
    order = {fb.id: i for i, fb in enumerate(rows)}
    return Resolved(
        verdicts=sorted((g[-1] for g in verdicts.values()), key=lambda fb: order[fb.id]),
        rewards=sorted(rewards.values(), key=lambda fb: order[fb.id]),
        preferences=sorted((g[-1] for g in preferences.values()), key=lambda fb: order[fb.id]),
        report=report,
    )


def build_export(
    fmt: str,
    rows: Rows,
    records: Records,
    holdout: float | Callable[[str], float] = 0.0,
) -> tuple[list[dict[str, Any]], ExportReport]:
    """Leave out feedback on held-out completions (``holdout``: the share, or the share of a
    record's model; see ``store.holdout``; a preference whose either side is held out goes
    too), resolve conflicting verdicts, then write ``fmt``'s records."""

    def hidden(completion_id: str) -> bool:
        record = records.get(completion_id)
        share = holdout(record.model if record else "") if callable(holdout) else holdout
        return held_out(completion_id, share)

    def with_tools(completion_id: str | None) -> bool:
        record = records.get(completion_id) if completion_id is not None else None
        return record is not None and record.uses_tools

    visible = [
        fb
        for fb in rows
        if not hidden(fb.completion_id)
        and not (fb.preferred_over is not None and hidden(fb.preferred_over))
    ]
    kept = [
        fb
        for fb in visible
        if not with_tools(fb.completion_id) and not with_tools(fb.preferred_over)
    ]
    resolved = resolve_conflicts(kept)
    resolved.report.feedback_rows = len(rows)
    resolved.report.held_out = len(rows) - len(visible)
    resolved.report.with_tools = len(visible) - len(kept)
    if fmt == "dpo":
        items = preference_pairs(resolved.preferences, records)
        items += rated_pairs(resolved.verdicts, records)
    elif fmt == "quark":
        items = to_quark(resolved.rewards, records)
    else:
        items = FORMATS[fmt](resolved.verdicts, records)
    resolved.report.records = len(items)
    return items, resolved.report


FORMATS: dict[str, Callable[[Rows, Records], list[dict[str, Any]]]] = {
    "cut": to_cut,
    "kto": to_kto,
    "trl-kto": to_trl_kto,
    "dpo": to_dpo,
    "quark": to_quark,
}
