"""The length-controlled win rate (alpaca_eval's GLM, Dubois et al. 2024): what the win rate
would be if the candidate's answers were as long as the incumbent's.

LLM judges prefer longer answers. alpaca_eval fits a logistic model of each preference on
the models' identity and ``tanh(length difference / its standard deviation)`` (plus an
instruction-difficulty term that needs many models to identify: with one pair of models
it is left out here), then reads the win rate off the model with the length term at zero.
Here, over the gate's items (ties half):

    P(candidate preferred on item i) = σ(θ + φ · tanh((len_c,i − len_i,i) / sd))

fitted by maximum likelihood; the length-controlled win rate is σ(θ). Its one-sided lower
bound is a percentile bootstrap over items (approximate, unlike the raw rate's exact test).

Owns: the fit and its bootstrap. Does not know: judges, engines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, log_expit

RESAMPLES = 400


@dataclass(frozen=True)
class LengthControlled:
    win_rate: float  # σ(θ): the candidate's win rate at equal lengths
    lower_bound: float  # one-sided, percentile bootstrap over items
    length_coefficient: float  # φ: how much the judge's verdicts follow length


def _fit(scores: np.ndarray, x: np.ndarray) -> np.ndarray:
    def loss(params: np.ndarray) -> float:
        z = params[0] + params[1] * x
        return float(-(scores * log_expit(z) + (1 - scores) * log_expit(-z)).sum())

    def grad(params: np.ndarray) -> np.ndarray:
        residual = expit(params[0] + params[1] * x) - scores
        return np.array([residual.sum(), (residual * x).sum()])

    # A tiny ridge keeps a separable sample (every item won) finite, as the rating fit does.
    ridge = 1e-3
    result = minimize(
        lambda p: loss(p) + ridge * float(p @ p),
        np.zeros(2),
        jac=lambda p: grad(p) + 2 * ridge * p,
        method="L-BFGS-B",
    )
    return np.asarray(result.x)


def length_controlled(
    scores: list[float],
    candidate_lengths: list[int],
    incumbent_lengths: list[int],
    *,
    confidence: float = 0.95,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> LengthControlled:
    """``scores``: per item, 1 (candidate won), 0 (lost), 0.5 (tie); lengths in tokens."""
    y = np.asarray(scores, dtype=float)
    if y.size == 0:
        return LengthControlled(0.5, 0.0, 0.0)
    diff = np.asarray(candidate_lengths, dtype=float) - np.asarray(incumbent_lengths, dtype=float)
    sd = float(diff.std())
    x = np.tanh(diff / sd) if sd > 0 else np.zeros_like(diff)
    theta, phi = _fit(y, x)
    rng = np.random.default_rng(seed)
    boot = np.empty(resamples)
    for r in range(resamples):
        pick = rng.integers(0, y.size, y.size)
        boot[r] = expit(_fit(y[pick], x[pick])[0])
    low = float(np.percentile(boot, 100 * (1 - confidence))) if resamples else 0.0
    return LengthControlled(
        win_rate=round(float(expit(theta)), 6),
        lower_bound=round(low, 6),
        length_coefficient=round(float(phi), 6) if math.isfinite(phi) else 0.0,
    )
