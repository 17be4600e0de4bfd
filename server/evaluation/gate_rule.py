"""The promotion gate's decision as a test that can tell: is the candidate better than the
version it would replace?

Each judged item is a win, a loss or a tie for the candidate (a pairwise verdict asked in
both orders; one that flips with the order is a tie). The win rate counts ties half.

**Superiority** (the default): promote only if the one-sided lower confidence bound of the
win rate is above 0.5. Given the ties, the win rate is ``t/2 + (1 − t)·q`` with ``q`` the
share of wins among the decisive items, so the bound is ``t/2 + (1 − t)·q_low`` with
``q_low`` the one-sided Clopper–Pearson bound of ``q``: above 0.5 exactly when the exact
sign test of wins against losses rejects ``q ≤ 0.5`` at level 1 − confidence (the report
gives its p-value). The test is exact for every number of decisive items, so a candidate
exactly as good as the incumbent is promoted at most 5 % of the time whatever the share of
ties (``false_promotion``).

**Non-inferiority** (``mode: non-inferiority``, for refresh training): promote if the same
bound is above ``0.5 − margin``. A candidate as good as the incumbent is then promoted
often (at 116 items and margin 0.05: 25 % of the time without ties, 32 % with 30 % ties):
that is what the mode is for.

The default number of items comes from ``required_items``: the fewest with ≥ 80 % power
at a true win rate of 0.60 with 30 % ties (wins 45 %, losses 25 %), computed exactly.

Also refused, whatever the counts: more than ``max_unreadable`` of the pairs unreadable (the
judge's replies could not be parsed: the items left are no longer the sample that was
drawn), and a judge whose verdicts flip with the order on more than ``max_flips`` of the
pairs (it answers by position, not by content).

Owns: the rule and its power. Does not know: judges, engines, HTTP.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any, Literal

from scipy.stats import beta, binom

Mode = Literal["superiority", "non-inferiority"]


@dataclass(frozen=True)
class GateRule:
    mode: Mode = "superiority"
    margin: float = 0.05  # non-inferiority only: promote above 0.5 − margin
    confidence: float = 0.95  # one-sided
    max_unreadable: float = 0.10  # share of pairs; above it the gate does not decide
    max_flips: float = 0.50  # share of judged pairs whose verdict flipped with the order
    # Decide on the length-controlled win rate's bound (``length_control``) instead of the
    # raw one (the unreadable and flip checks apply either way).
    length_controlled: bool = False

    @property
    def threshold(self) -> float:
        return 0.5 if self.mode == "superiority" else 0.5 - self.margin


@dataclass(frozen=True)
class GateDecision:
    promoted: bool
    decided: bool  # False: the gate refused to decide (unreadable verdicts, a position judge)
    reason: str
    mode: str
    wins: int
    losses: int
    ties: int
    n: int
    win_rate: float
    lower_bound: float  # one-sided, at ``confidence``
    threshold: float
    p_value: float  # exact sign test of wins against losses (superiority's H0: q ≤ 0.5)
    unreadable: int = 0
    flips: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def lower_bound(wins: int, losses: int, ties: int, confidence: float = 0.95) -> float:
    """One-sided lower bound of the win rate, ties half (see the module docstring)."""
    n = wins + losses + ties
    if n == 0:
        return 0.0
    decisive = wins + losses
    if decisive == 0:
        return 0.5
    q_low = float(beta.ppf(1 - confidence, wins, losses + 1)) if wins else 0.0
    return (0.5 * ties + decisive * q_low) / n


def sign_test_p(wins: int, losses: int) -> float:
    """P(at least ``wins`` wins among the decisive items | a win is as likely as a loss)."""
    decisive = wins + losses
    return float(binom.sf(wins - 1, decisive, 0.5)) if decisive else 1.0


def decide(
    wins: int,
    losses: int,
    ties: int,
    rule: GateRule = GateRule(),
    *,
    unreadable: int = 0,
    flips: int = 0,
) -> GateDecision:
    n = wins + losses + ties
    rate = (wins + 0.5 * ties) / n if n else 0.5
    low = lower_bound(wins, losses, ties, rule.confidence)
    p = sign_test_p(wins, losses)
    numbers = f"win rate {rate:.3f} over {n} ({wins}-{losses}-{ties})"
    bound = f"{rule.confidence:.0%} lower bound {low:.3f}"
    decided, promoted = True, False
    asked = n + unreadable
    if asked and unreadable / asked > rule.max_unreadable:
        decided = False
        reason = (
            f"{unreadable} of {asked} pairs were unreadable (more than "
            f"{rule.max_unreadable:.0%}): the gate does not decide on what is left"
        )
    elif n and flips / n > rule.max_flips:
        decided = False
        reason = (
            f"the judge's verdict flipped with the order on {flips} of {n} pairs (more than "
            f"{rule.max_flips:.0%}): it is unreliable for this gate"
        )
    elif n == 0:
        reason = "no judged comparisons"
    elif low > rule.threshold:
        promoted = True
        reason = f"{numbers}, {bound} above {rule.threshold:.2f} ({rule.mode}; p = {p:.4f})"
    else:
        reason = f"{numbers}, {bound} not above {rule.threshold:.2f} ({rule.mode}; p = {p:.4f})"
    return GateDecision(
        promoted=promoted,
        decided=decided,
        reason=reason,
        mode=rule.mode,
        wins=wins,
        losses=losses,
        ties=ties,
        n=n,
        win_rate=round(rate, 6),
        lower_bound=round(low, 6),
        threshold=rule.threshold,
        p_value=round(p, 6),
        unreadable=unreadable,
        flips=flips,
    )


@functools.cache
def _critical_wins(decisive: int, alpha: float) -> int:
    """The fewest wins among ``decisive`` items that the sign test promotes at ``alpha``."""
    c = int(binom.isf(alpha, decisive, 0.5))
    while c > 0 and binom.sf(c - 2, decisive, 0.5) <= alpha:
        c -= 1
    while binom.sf(c - 1, decisive, 0.5) > alpha:
        c += 1
    return c


def promotion_probability(n: int, p_win: float, p_loss: float, confidence: float = 0.95) -> float:
    """P(superiority promotes) over ``n`` items whose outcomes are drawn independently: a
    win with ``p_win``, a loss with ``p_loss``, a tie otherwise (exact)."""
    alpha = 1 - confidence
    p_decisive = p_win + p_loss
    if p_decisive == 0:
        return 0.0
    q = p_win / p_decisive
    total = 0.0
    for decisive in range(1, n + 1):
        c = _critical_wins(decisive, alpha)
        total += float(binom.pmf(decisive, n, p_decisive) * binom.sf(c - 1, decisive, q))
    return total


def required_items(
    win_rate: float = 0.60, ties: float = 0.30, power: float = 0.80, confidence: float = 0.95
) -> int:
    """The fewest items with at least ``power`` to promote a candidate of true ``win_rate``
    (ties half) whose share of ties is ``ties``."""
    p_win = win_rate - ties / 2
    p_loss = 1 - ties - p_win
    n = 1
    while promotion_probability(n, p_win, p_loss, confidence) < power:
        n += 1
        if n > 100_000:
            raise ValueError("no size up to 100,000 items reaches that power")
    return n
