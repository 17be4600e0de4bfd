"""The arena's rating mathematics: a Bradley–Terry leaderboard and the promotion gate's win rate.

Owns: turning judged battles into ratings in Chatbot Arena's formulation (logistic on base 10,
scale 400, the anchor model at exactly 1000, a tie counting half to each side), bootstrap
intervals, battle counts, the pairwise win-rate matrix; and the candidate-vs-incumbent win rate
with its interval and the gate's decision.
Does not know: where battles come from (the store, the judge), HTTP, the engine. Pure functions
of their arguments; randomness only through a seed or a ``numpy.random.Generator`` passed in.

The fit follows FastChat's ``compute_elo_mle_with_tie`` (``fastchat/serve/monitor/
elo_analysis.py``): battles are aggregated into unique (model, model, outcome) cells with counts,
the negative log-likelihood is minimised by SciPy's L-BFGS-B, and the bootstrap resamples the
cells' counts from a multinomial instead of refitting on raw rows, which is what makes 1,000
resamples take about a second.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from scipy.optimize import minimize
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.special import expit, log_expit
from scipy.stats import norm
from threadpoolctl import threadpool_limits

SCALE = 400.0
BASE = 10.0
ANCHOR_RATING = 1000.0
DEFAULT_RESAMPLES = 1000
# A vanishing L2 penalty on the natural-scale ratings (per unit of battle weight). It changes a
# well-posed fit by far less than 0.001 rating points, and it keeps the fit finite when the MLE
# does not exist (a model that never lost or never won): those rows are marked ``bounded=False``.
_RIDGE = 1e-8
_ALPHA = math.log(BASE)

Winner = Literal["a", "b", "tie", "both_bad"]
Outcome = Literal["win", "loss", "tie"]
_SCORE_OF_A: dict[str, float] = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}


class RatingsError(ValueError):
    """The battles cannot be rated as asked (no battles, an unknown anchor, or models that are
    not connected to each other through battles, whose ratings would share no scale)."""


@dataclass(frozen=True, slots=True)
class Battle:
    """One judged comparison of two models' answers to the same prompt.

    ``winner`` is ``"a"``, ``"b"``, ``"tie"`` or ``"both_bad"``. Like Chatbot Arena (which
    counts its "tie (bothbad)" vote as a tie), ``"both_bad"`` is rated as a tie: half a win to
    each side. It is kept apart in the input only so that callers need not lose the label.
    """

    model_a: str
    model_b: str
    winner: Winner

    def __post_init__(self) -> None:
        if self.winner not in _SCORE_OF_A:
            raise RatingsError(
                f"unknown winner {self.winner!r}; expected one of {list(_SCORE_OF_A)}"
            )
        if self.model_a == self.model_b:
            raise RatingsError(f"a battle needs two different models, got {self.model_a!r} twice")


@dataclass(frozen=True, slots=True)
class RatingRow:
    """One model's line on the leaderboard. ``low``/``high`` are the bootstrap interval; they are
    ``None`` when ``bounded`` is false: the model's rating relative to the anchor has no finite
    MLE (it never lost, or never won, against the anchor's group), so the shown rating is only
    where the tiny penalty stopped it and its order is all it means."""

    model: str
    rating: float
    low: float | None
    high: float | None
    battles: int
    wins: int
    losses: int
    ties: int
    bounded: bool
    # The rank's bootstrap interval (1 = best), as Chatbot Arena shows it: the percentiles of
    # this model's rank over the resamples (None without resamples).
    rank_low: int | None = None
    rank_high: int | None = None


@dataclass(frozen=True, slots=True)
class Leaderboard:
    """Rows sorted by rating (best first) and ``win_rates[row][col]``: the share of ``row``'s
    battles against ``col`` that ``row`` won, ties counting half; ``None`` on the diagonal and
    where the two never met."""

    rows: tuple[RatingRow, ...]
    win_rates: dict[str, dict[str, float | None]]
    anchor: str
    battles: int
    resamples: int
    confidence: float

    def to_json(self) -> dict[str, Any]:
        """A plain dict (lists, floats, ``None``) for ``json.dumps`` or a response model."""
        return {
            "anchor": self.anchor,
            "anchor_rating": ANCHOR_RATING,
            "scale": SCALE,
            "base": BASE,
            "battles": self.battles,
            "resamples": self.resamples,
            "confidence": self.confidence,
            "rows": [asdict(row) for row in self.rows],
            "win_rates": {a: dict(cols) for a, cols in self.win_rates.items()},
        }


@dataclass(frozen=True, slots=True)
class _Cells:
    """Battles aggregated: cell ``k`` is ``count[k]`` battles of ``models[i[k]]`` against
    ``models[j[k]]`` (``i < j``) in which ``i`` scored ``score[k]`` (1, 0.5 or 0)."""

    models: tuple[str, ...]
    i: np.ndarray
    j: np.ndarray
    score: np.ndarray
    count: np.ndarray


def _aggregate(battles: Iterable[Battle]) -> _Cells:
    rows = [(b.model_a, b.model_b, _SCORE_OF_A[b.winner]) for b in battles]
    if not rows:
        raise RatingsError("no battles to rate")
    models = tuple(sorted({m for a, b, _ in rows for m in (a, b)}))
    index = {m: k for k, m in enumerate(models)}
    raw = np.array([(index[a], index[b], round(2 * s)) for a, b, s in rows], dtype=np.int64)
    # Orient every battle from its lower-indexed model's side, so A-vs-B and B-vs-A share cells.
    flip = raw[:, 0] > raw[:, 1]
    raw[flip] = np.column_stack([raw[flip, 1], raw[flip, 0], 2 - raw[flip, 2]])
    cells, count = np.unique(raw, axis=0, return_counts=True)
    return _Cells(models, cells[:, 0], cells[:, 1], cells[:, 2] / 2.0, count.astype(np.float64))


def _fit(cells: _Cells, weight: np.ndarray, x0: np.ndarray, *, tight: bool) -> np.ndarray:
    """Natural-scale strengths (rating = SCALE·θ + const) maximising the Bradley–Terry likelihood
    for cells weighted by ``weight``; a tie's score of 0.5 makes it half a win each way.

    ``tight`` is for the reported point (about 1e-5 rating points); bootstrap refits stop at
    about 1e-4 points, which leaves the percentiles unchanged and takes a third fewer steps."""
    n = len(cells.models)
    i, j, s = cells.i, cells.j, cells.score
    w = weight / weight.sum()

    def loss_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        d = _ALPHA * (theta[i] - theta[j])
        loss = -(w * (s * log_expit(d) + (1.0 - s) * log_expit(-d))).sum()
        g = -_ALPHA * w * (s - expit(d))
        grad = np.bincount(i, g, n) - np.bincount(j, g, n) + _RIDGE * theta
        return float(loss + 0.5 * _RIDGE * (theta * theta).sum()), grad

    result = minimize(
        loss_and_grad,
        x0,
        jac=True,
        method="L-BFGS-B",
        options={
            "maxiter": 1000,
            "ftol": 1e-15 if tight else 1e-12,
            "gtol": 1e-11 if tight else 1e-8,
        },
    )
    return np.asarray(result.x)


def _check_connected(cells: _Cells) -> None:
    n = len(cells.models)
    graph = coo_matrix((np.ones(len(cells.i)), (cells.i, cells.j)), shape=(n, n))
    count, labels = connected_components(graph, directed=False)
    if count > 1:
        groups = [
            [m for m, g in zip(cells.models, labels, strict=True) if g == k] for k in range(count)
        ]
        raise RatingsError(
            "the battles split the models into groups that never met, so their ratings share no "
            f"scale: {groups}; rate each group separately or collect battles between them"
        )


def _bounded(cells: _Cells, anchor: int) -> np.ndarray:
    """Which models have a finite MLE relative to the anchor: those in the anchor's strongly
    connected component of the 'scored at least half a point against' graph (Zermelo/Ford's
    condition). A model that only ever won against that group sits above it at infinity."""
    n = len(cells.models)
    a_scored = cells.score > 0
    b_scored = cells.score < 1
    src = np.concatenate([cells.i[a_scored], cells.j[b_scored]])
    dst = np.concatenate([cells.j[a_scored], cells.i[b_scored]])
    graph = coo_matrix((np.ones(len(src)), (src, dst)), shape=(n, n))
    _, labels = connected_components(graph, directed=True, connection="strong")
    return np.asarray(labels == labels[anchor])


def _records(cells: _Cells) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per model: wins, losses, ties."""
    n = len(cells.models)
    wins, losses, ties = np.zeros(n), np.zeros(n), np.zeros(n)
    for i, j, s, c in zip(cells.i, cells.j, cells.score, cells.count, strict=True):
        if s == 1.0:
            wins[i] += c
            losses[j] += c
        elif s == 0.0:
            wins[j] += c
            losses[i] += c
        else:
            ties[i] += c
            ties[j] += c
    return wins, losses, ties


def _win_rates(cells: _Cells) -> dict[str, dict[str, float | None]]:
    n = len(cells.models)
    points = np.zeros((n, n))
    games = np.zeros((n, n))
    np.add.at(points, (cells.i, cells.j), cells.score * cells.count)
    np.add.at(points, (cells.j, cells.i), (1.0 - cells.score) * cells.count)
    np.add.at(games, (cells.i, cells.j), cells.count)
    np.add.at(games, (cells.j, cells.i), cells.count)
    return {
        a: {
            b: (float(points[x, y] / games[x, y]) if x != y and games[x, y] else None)
            for y, b in enumerate(cells.models)
        }
        for x, a in enumerate(cells.models)
    }


def leaderboard(
    battles: Iterable[Battle],
    *,
    anchor: str | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    rng: np.random.Generator | int | None = 0,
) -> Leaderboard:
    """Rate the models that appear in ``battles``.

    ``anchor`` is pinned at exactly 1000 (default: the first model alphabetically, so the scale
    does not move when battles arrive in another order). Intervals are percentile bootstrap
    intervals over ``resamples`` resamplings of the battles with replacement (0: no intervals);
    ``rng`` seeds them, so the same battles give the same leaderboard. ``rating`` is the fit on
    all battles (not the bootstrap median); the anchor's interval is [1000, 1000] by
    construction, and the others' are relative to it. A resample that happens to drop every
    battle between two groups is still fitted (the tiny penalty keeps it finite); with real
    data such resamples are rare and only widen the tails.

    Raises ``RatingsError`` for no battles, an anchor that never battled, or models split into
    groups that never met (there is no common scale to report).
    """
    if resamples < 0:
        raise RatingsError("resamples must be >= 0")
    if not 0.0 < confidence < 1.0:
        raise RatingsError("confidence must be between 0 and 1")
    cells = _aggregate(battles)
    models = cells.models
    anchor = models[0] if anchor is None else anchor
    if anchor not in models:
        raise RatingsError(f"the anchor model {anchor!r} has no battles")
    _check_connected(cells)
    k = models.index(anchor)
    bounded = _bounded(cells, k)

    theta = _fit(cells, cells.count, np.zeros(len(models)), tight=True)
    ratings = SCALE * (theta - theta[k]) + ANCHOR_RATING

    low = np.full(len(models), np.nan)
    high = np.full(len(models), np.nan)
    rank_bounds = None
    if resamples:
        generator = np.random.default_rng(rng)
        total = int(cells.count.sum())
        draws = generator.multinomial(total, cells.count / total, size=resamples)
        boot = np.empty((resamples, len(models)))
        # L-BFGS-B's BLAS calls are on vectors of a few models: with OpenBLAS's threads they
        # spin against each other, and on a busy 2-core machine 1,000 refits went from 0.4 s
        # to 4-9 s. One thread keeps them at 0.4 s.
        with threadpool_limits(limits=1, user_api="blas"):
            for r, weight in enumerate(draws):
                fitted = _fit(cells, weight.astype(np.float64), theta, tight=False)
                boot[r] = SCALE * (fitted - fitted[k]) + ANCHOR_RATING
        tail = 100.0 * (1.0 - confidence) / 2.0
        low, high = np.percentile(boot, [tail, 100.0 - tail], axis=0)
        # Rank in each resample: 1 + the models rated strictly higher there.
        boot_ranks = 1 + (boot[:, None, :] > boot[:, :, None]).sum(axis=2)
        rank_bounds = np.percentile(boot_ranks, [tail, 100.0 - tail], axis=0)

    wins, losses, ties = _records(cells)
    rows = [
        RatingRow(
            model=m,
            rating=float(ratings[x]),
            low=float(low[x]) if bounded[x] and not math.isnan(low[x]) else None,
            high=float(high[x]) if bounded[x] and not math.isnan(high[x]) else None,
            battles=int(wins[x] + losses[x] + ties[x]),
            wins=int(wins[x]),
            losses=int(losses[x]),
            ties=int(ties[x]),
            bounded=bool(bounded[x]),
            rank_low=int(np.floor(rank_bounds[0][x])) if rank_bounds is not None else None,
            rank_high=int(np.ceil(rank_bounds[1][x])) if rank_bounds is not None else None,
        )
        for x, m in enumerate(models)
    ]
    rows.sort(key=lambda row: (-row.rating, row.model))
    return Leaderboard(
        rows=tuple(rows),
        win_rates=_win_rates(cells),
        anchor=anchor,
        battles=int(cells.count.sum()),
        resamples=resamples,
        confidence=confidence,
    )


# --- The promotion gate -------------------------------------------------------------------------


def combine_both_orders(first: Outcome, second: Outcome) -> Outcome:
    """One verdict from a pairwise judge asked in both orders, both given from the candidate's
    side. Agreeing verdicts stand; disagreeing ones are a tie (MT-Bench's rule), which cancels
    the judge's position bias instead of counting it as evidence."""
    return first if first == second else "tie"


@dataclass(frozen=True, slots=True)
class WinRate:
    """The candidate's score share (ties half) over ``n`` comparisons, with a Wilson interval."""

    win_rate: float
    low: float
    high: float
    wins: int
    losses: int
    ties: int
    n: int


def win_rate(outcomes: Iterable[Outcome], *, confidence: float = 0.95) -> WinRate:
    """Win rate with ties counting half, and its Wilson score interval.

    Wilson rather than a bootstrap: it is deterministic, and at small ``n`` a bootstrap of
    3 wins out of 3 gives the interval [1, 1], which would let three lucky comparisons through
    the gate. Treating the score as a proportion of ``n`` is conservative with ties: a score in
    {0, ½, 1} with mean p has variance at most p(1−p). No outcomes: rate 0.5, interval [0, 1].
    """
    counts = {"win": 0, "loss": 0, "tie": 0}
    for outcome in outcomes:
        if outcome not in counts:
            raise RatingsError(f"unknown outcome {outcome!r}; expected win, loss or tie")
        counts[outcome] += 1
    wins, losses, ties = counts["win"], counts["loss"], counts["tie"]
    n = wins + losses + ties
    if n == 0:
        return WinRate(0.5, 0.0, 1.0, 0, 0, 0, 0)
    p = (wins + 0.5 * ties) / n
    z = float(norm.ppf(0.5 + confidence / 2.0))
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return WinRate(p, max(0.0, centre - half), min(1.0, centre + half), wins, losses, ties, n)
