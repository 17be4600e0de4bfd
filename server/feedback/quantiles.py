"""Quark's reward quantiles: which of K quantile tokens each scored generation is trained on.

Pools. A prompt with at least K scored generations is one pool of its own (ALT's
``map_into_quantiles``, per prompt); every other generation of the window goes into ONE
shared pool (Quark's original, the whole data pool at once).

Within one pool of n rewards, with K tokens (0 = best):
1. n < K: every generation gets the worst quantile, K - 1 (ALT's rule for a prompt with too
   few generations) — so a lone thumbs-down is ``K - 1``, never 0.
2. All n rewards equal: every generation gets K - 1 (equal rewards rank nothing).
3. Otherwise sort by reward, best first; position p (0-based) falls in group
   ``min(p // (n // K), K - 1)``: K equal groups of n // K, the remainder to the last (ALT).
   A run of equal rewards, at positions first..last, shares the group of its middle
   position ``(first + last) // 2`` (the mid-rank a statistician gives ties).

Hence: equal rewards share a quantile; a lower reward never gets a better (smaller)
quantile than a higher one (middle positions increase with the reward's rank); without ties
the rule is exactly ALT's; and with K ≥ 2 a pool's lowest reward is never quantile 0 unless
rule 1 or 2 applies (its run ends at n - 1 and starts at 1 or later, so its middle is at
least n // 2, past the first group). Examples with K = 5: 7 distinct rewards → groups of 1,
1, 1, 1, 3; one 1.0 and nine 0.0 → 0 for the 1.0 and 2 for the nine (positions 1..9,
middle 5, 5 // 2 = 2).

Owns: the rule, as pure functions. Does not know: feedback rows, files, SQL.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Protocol


class Scored(Protocol):
    @property
    def prompt(self) -> str: ...

    @property
    def reward(self) -> float: ...


def assign_quantiles(rewards: Sequence[float], k: int) -> list[int]:
    """The quantile (0 = best) of each reward of ONE pool, in the order given."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    n = len(rewards)
    if n < k or len(set(rewards)) <= 1:
        return [k - 1] * n
    size = n // k
    order = sorted(range(n), key=lambda i: rewards[i], reverse=True)
    quantiles = [0] * n
    first = 0
    while first < n:
        last = first
        while last + 1 < n and rewards[order[last + 1]] == rewards[order[first]]:
            last += 1
        q = min((first + last) // 2 // size, k - 1)
        for position in range(first, last + 1):
            quantiles[order[position]] = q
        first = last + 1
    return quantiles


def quantile_pools(items: Sequence[Scored], k: int) -> list[int]:
    """The quantile of each item: within its prompt when that prompt has at least ``k``
    items, else within one pool of all such items together."""
    by_prompt: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        by_prompt[item.prompt].append(i)
    pools = [group for group in by_prompt.values() if len(group) >= k]
    pools.append([i for group in by_prompt.values() if len(group) < k for i in group])
    quantiles = [0] * len(items)
    for pool in pools:
        for i, q in zip(pool, assign_quantiles([items[i].reward for i in pool], k), strict=True):
            quantiles[i] = q
    return quantiles
