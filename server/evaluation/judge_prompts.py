"""Judge prompts and the parsing of judges' replies.

Owns: loading a judge's prompt file (``templates/judges/<kind>-v1.jinja`` or a path), its
version (file name + a short hash of its bytes, stored with every verdict, so a reworded prompt
is a new version), rendering it into the one user message a judge receives, and the strict
parsers that turn a reply into a verdict — or refuse it.
Does not know: HTTP, the store, which endpoint judges. Pure functions of their arguments.

The output markers are MT-Bench's (FastChat ``llm_judge``): ``Rating: [[7]]`` for a score and
``[[A]]`` / ``[[B]]`` / ``[[C]]`` (a tie) for a pair; the judgment kind ends CUT's free-text
judgment with ``Verdict: [[GOOD]]`` or ``Verdict: [[BAD]]``. Parsing is strict where MT-Bench
is lenient: no marker, two different markers, or a score off the 1-10 scale is unparseable
(``JudgeReplyError``), never a guess — a verdict that trains a model must be one the judge gave.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from jinja2 import StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from server.models.families import templates_dir

Kind = Literal["judgment", "score", "pairwise"]
Side = Literal["a", "b", "tie"]


class JudgeReplyError(ValueError):
    """A judge's reply carries no verdict that can be read. ``reason`` labels the metric."""

    def __init__(self, message: str, reason: str = "unparseable", replies: tuple[str, ...] = ()):
        super().__init__(message)
        self.reason = reason
        self.replies = replies


@dataclass(frozen=True)
class JudgePrompt:
    name: str  # the file's name, e.g. "score-v1.jinja"
    version: str  # name + "@" + the first 8 hex digits of the file's SHA-256
    source: str

    @classmethod
    def load(cls, name: str) -> JudgePrompt:
        """A file in ``templates/judges/`` or a path (a models file's prompts arrive absolute)."""
        path = Path(name)
        if not path.is_absolute():
            path = templates_dir() / "judges" / name
        if not path.is_file():
            raise FileNotFoundError(f"judge prompt {name!r} not found (looked in {path.parent})")
        raw = path.read_bytes()
        digest = hashlib.sha256(raw).hexdigest()[:8]
        return cls(name=path.name, version=f"{path.name}@{digest}", source=raw.decode())

    def render(self, **values: Any) -> str:
        return _ENV.from_string(self.source).render(**values).strip()


_ENV = ImmutableSandboxedEnvironment(
    undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True
)


def judgment_message(prompt: JudgePrompt, conversation: list[dict[str, str]], response: str) -> str:
    return prompt.render(conversation=conversation, response=response)


def pairwise_message(
    prompt: JudgePrompt, conversation: list[dict[str, str]], answer_a: str, answer_b: str
) -> str:
    return prompt.render(conversation=conversation, answer_a=answer_a, answer_b=answer_b)


# --- Constrained replies ---------------------------------------------------------------------

# Each kind's reply as a regular expression the parser below accepts: free words (no
# brackets), then the marker. The words are capped at a character per token left after the
# marker's share, so the marker fits in ``max_tokens`` however the words tokenize.
_MARKERS = {
    "pairwise": r"\[\[[ABC]\]\]",
    "score": r"Rating: \[\[([1-9]|10)\]\]",
    "judgment": r"Verdict: \[\[(GOOD|BAD)\]\]",
}


def reply_pattern(kind: str, max_tokens: int) -> str:
    """The regex a constrained judge reply follows (vLLM ``structured_outputs.regex``).
    A judgment starts with a word, so a BAD verdict always says something."""
    words = max(0, min(4000, max_tokens - 16))
    start = "[A-Za-z]" if kind == "judgment" else ""
    return f"{start}[^\\[\\]]{{0,{words}}}{_MARKERS[kind]}"


# --- Parsers -----------------------------------------------------------------------------------

_SCORE = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_PAIR = re.compile(r"\[\[\s*([ABC])\s*\]\]")
_VERDICT = re.compile(r"\[\[\s*(GOOD|BAD)\s*\]\]", re.IGNORECASE)
# The verdict line, removed from a judgment's text ("Verdict: [[BAD]]", "**Verdict:** [[BAD]]").
_VERDICT_LINE = re.compile(r"^[\s*_#>-]*(?:final\s+)?verdict\s*[*_]*:?[*_]*\s*$", re.IGNORECASE)


def _one(values: list[str], what: str, reply: str) -> str:
    distinct = sorted(set(values))
    if not distinct:
        raise JudgeReplyError(f"no {what} marker in the reply", "no_marker", (reply,))
    if len(distinct) > 1:
        raise JudgeReplyError(
            f"conflicting {what} markers in the reply: {', '.join(distinct)}", "ambiguous", (reply,)
        )
    return distinct[0]


@dataclass(frozen=True)
class Judgment:
    good: bool
    text: str | None  # what is wrong (None when the verdict is GOOD)


def parse_judgment(reply: str) -> Judgment:
    """``Verdict: [[GOOD]]`` → fine, no judgment text; ``[[BAD]]`` → the reply without its
    verdict line is the judgment (CUT's training signal), and must say something."""
    verdict = _one([m.upper() for m in _VERDICT.findall(reply)], "verdict", reply)
    if verdict == "GOOD":
        return Judgment(good=True, text=None)
    lines = [_VERDICT.sub("", line).rstrip() for line in reply.strip().splitlines()]
    text = "\n".join(line for line in lines if not _VERDICT_LINE.match(line)).strip()
    if not re.search(r"\w", text):
        raise JudgeReplyError("a BAD verdict without a judgment", "empty_judgment", (reply,))
    return Judgment(good=False, text=text)


def parse_score(reply: str) -> float:
    """MT-Bench's ``[[rating]]``: exactly one distinct value on the 1-10 scale."""
    score = float(_one(_SCORE.findall(reply), "rating", reply))
    if not 1 <= score <= 10:
        raise JudgeReplyError(f"rating {score:g} is off the 1-10 scale", "out_of_range", (reply,))
    return score


def parse_pair(reply: str) -> Side:
    """``[[A]]``, ``[[B]]`` or ``[[C]]`` (a tie), exactly one of them."""
    return {"A": "a", "B": "b", "C": "tie"}[_one(_PAIR.findall(reply), "verdict", reply)]  # type: ignore[return-value]


def unswap(side: Side) -> Side:
    """A verdict given with A and B swapped, told from the original order's side."""
    return {"a": "b", "b": "a", "tie": "tie"}[side]  # type: ignore[return-value]
