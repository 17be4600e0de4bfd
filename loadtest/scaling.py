"""A worked estimate of throughput against replicas, from one replica's measured figures:
what a 2-core machine cannot show (two replicas here share the same two cores).

The model, stated so it can be checked against a real cluster:
- a replica with ``k`` requests in flight produces ``T(k) = k·r1 / (1 + α·(k − 1))`` output
  tokens/s: ``r1`` is its rate at k = 1, and ``α`` is fitted so that T matches the measured
  rate at the higher concurrency (vLLM's batch: per-request speed falls as the batch grows);
- ``n`` replicas, each on its own cores (or chip), share ``C`` concurrent requests evenly
  (Ray Serve's power-of-two-choices routing keeps them within one or two of even);
- the front end is one more ceiling: it spends a measured CPU time per 1,000 output tokens
  (rendering, detokenized streaming, the Ray hop), so one front-end core streams at most
  ``1e6 / front_end_ms_per_1k_tokens`` tokens/s; ``front_ends`` of them multiply that.
The estimate is ``min(n · T(C / n), front_ends · ceiling)``. It ignores the network between
nodes and the head's own work, both small beside a decode step on a CPU or GPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ReplicaCurve:
    r1: float  # output tokens/s of one replica at concurrency 1
    alpha: float  # batch saturation (0: perfect batching; 1: no gain from batching)

    @classmethod
    def fit(cls, r1: float, c: int, rc: float) -> ReplicaCurve:
        """Through (1, r1) and (c, rc): rc = c·r1 / (1 + α(c − 1))."""
        if c <= 1:
            raise ValueError("need a second concurrency above 1 to fit the curve")
        alpha = (c * r1 / rc - 1) / (c - 1)
        return cls(r1, min(max(alpha, 0.0), 1.0))

    def tokens_per_s(self, k: float) -> float:
        if k <= 0:
            return 0.0
        return k * self.r1 / (1 + self.alpha * (k - 1))


def estimate(
    curve: ReplicaCurve,
    *,
    replicas: Sequence[int],
    concurrency: Sequence[int],
    front_end_ms_per_1k_tokens: float,
    front_ends: int = 1,
) -> list[dict[str, Any]]:
    """One row per (concurrency, replicas): the estimated tokens/s and what bounds it."""
    ceiling = front_ends * 1e6 / front_end_ms_per_1k_tokens
    rows = []
    for c in concurrency:
        for n in replicas:
            engines = n * curve.tokens_per_s(c / n)
            rows.append(
                {
                    "concurrency": c,
                    "replicas": n,
                    "tokens_per_s": min(engines, ceiling),
                    "bound": "front end" if ceiling < engines else "replicas",
                    "speedup": min(engines, ceiling) / min(curve.tokens_per_s(c), ceiling),
                }
            )
    return rows


def from_results(payload: Mapping[str, Any], server: str) -> tuple[ReplicaCurve, float]:
    """The curve and front-end cost of ``server`` in a ``compare`` results.json (its lowest
    and highest concurrency levels, one replica)."""
    levels = sorted(payload["servers"][server]["levels"], key=lambda s: s["load"]["concurrency"])
    low, high = levels[0], levels[-1]
    if low["load"]["concurrency"] != 1:
        raise ValueError("the results need a concurrency-1 level")
    curve = ReplicaCurve.fit(
        low["output_throughput"], high["load"]["concurrency"], high["output_throughput"]
    )
    return curve, float(high["cpu"]["front_end_ms_per_1k_tokens"])


def markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "| concurrency | replicas | est. output tok/s | × one replica | bound |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['concurrency']} | {r['replicas']} | {r['tokens_per_s']:.0f} "
        f"| {r['speedup']:.2f} | {r['bound']} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"
