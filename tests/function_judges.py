"""Function judges the tests name as ``tests.function_judges:NAME`` (verifiable rewards)."""

from __future__ import annotations


def words(conversation: list[dict[str, str]], response: str) -> float:
    """Score 1-10: 10 for an answer of one to three words, 1 for a longer one."""
    return 10.0 if 1 <= len(response.split()) <= 3 else 1.0


def capital(conversation: list[dict[str, str]], response: str) -> str | None:
    """A judgment: what is wrong, or None when the answer names Canberra."""
    return None if "Canberra" in response else "The capital of Australia is Canberra."


def shorter(conversation: list[dict[str, str]], a: str, b: str) -> str:
    """Pairwise: the shorter answer wins."""
    return "a" if len(a) < len(b) else "b" if len(b) < len(a) else "tie"


def first(conversation: list[dict[str, str]], a: str, b: str) -> str:
    """A position judge: always the first answer shown."""
    return "a"


def broken(conversation: list[dict[str, str]], response: str) -> float:
    return 42.0  # outside 1-10
