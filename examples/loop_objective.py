"""A rule code can check, as function judges (README "AI judges"): the objective of the
online-loop benchmark (`python -m loadtest loop`), and the random judges of its null control.

The rule, "a concise, finished answer":
- 15 to 60 words;
- it ends a sentence (`.`, `!` or `?`): an answer cut off by `max_tokens` does not;
- no sentence repeated (a model looping on itself does not pass by being short).
An empty or degenerate answer cannot meet it. It is fixed before any run (not tuned to
results); the benchmark reports the base model's rate on held-out prompts.

Use in a models file (this folder is importable when the models file sits in it, or on
PYTHONPATH):

    judges:
      - {name: concise, kind: function, target: "loop_objective:score", sample: 1.0}
"""

from __future__ import annotations

import hashlib
import random
import re

MIN_WORDS, MAX_WORDS = 15, 60
_SENTENCE = re.compile(r"[^.!?]+[.!?]")


def problems(response: str) -> list[str]:
    """What keeps ``response`` from meeting the rule (empty: it meets it)."""
    text = response.strip()
    words = len(text.split())
    found = []
    if words < MIN_WORDS:
        found.append(f"too short: {words} words; answer in {MIN_WORDS} to {MAX_WORDS} words")
    if words > MAX_WORDS:
        found.append(f"too long: {words} words; answer in {MIN_WORDS} to {MAX_WORDS} words")
    if not text or text[-1] not in ".!?":
        found.append("unfinished: the answer does not end a sentence")
    sentences = [s.strip().lower() for s in _SENTENCE.findall(text)]
    if len(sentences) != len(set(sentences)):
        found.append("repetitive: a sentence is repeated")
    return found


def meets(response: str) -> bool:
    return not problems(response)


def score(conversation: list[dict[str, str]], response: str) -> float:
    """A score judge: 10 when the answer meets the rule, else 1 (threshold 7 → a label)."""
    return 10.0 if meets(response) else 1.0


def judgment(conversation: list[dict[str, str]], response: str) -> str | None:
    """A judgment judge (CUT): what is wrong, in words, or None when nothing is."""
    found = problems(response)
    if not found:
        return None
    text = "; ".join(found)
    return text[0].upper() + text[1:] + "."


def pairwise(conversation: list[dict[str, str]], a: str, b: str) -> str:
    """A pairwise judge: the answer that meets the rule wins; both or neither: a tie."""
    if meets(a) == meets(b):
        return "tie"
    return "a" if meets(a) else "b"


# The null control: judges that answer at random (seeded per process). The pairwise one
# draws per unordered pair, so both orders of a pair agree (a judge that flipped with the
# order would stop the gate before its test: the null control must reach the test).
_RANDOM = random.Random(0)


def random_score(conversation: list[dict[str, str]], response: str) -> float:
    return float(_RANDOM.randint(1, 10))


def random_judgment(conversation: list[dict[str, str]], response: str) -> str | None:
    return None if _RANDOM.random() < 0.5 else "The answer could be better."


def random_pairwise(conversation: list[dict[str, str]], a: str, b: str) -> str:
    first, second = sorted((a, b))
    seed = hashlib.sha256(f"{first}\0{second}".encode()).digest()
    winner = random.Random(seed).choice([first, second, None])
    return "tie" if winner is None or a == b else "a" if winner == a else "b"
