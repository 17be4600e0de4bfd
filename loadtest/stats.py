"""Per-request measurements and their summary, with vLLM ``bench serve`` definitions.

TTFT = request sent → first content chunk; ITL = every gap between content chunks, pooled over
requests; TPOT = (E2E − TTFT) / (output tokens − 1) for requests with more than one token;
goodput = requests per second that meet every given SLO.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

PERCENTILES = (50, 90, 99)


@dataclass(slots=True)
class RequestResult:
    """One request as the client saw it; times in seconds, relative to the run's start."""

    started_at: float
    ttft: float | None = None
    latency: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    # How many tokens the workload asked for (max_tokens); lets a report spot short answers.
    expected_tokens: int = 0
    status: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.output_tokens < 2 or self.ttft is None or self.latency is None:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)

    def as_dict(self) -> dict[str, object]:
        return asdict(self) | {"tpot": self.tpot}


@dataclass(frozen=True, slots=True)
class Slo:
    """Service-level objectives for goodput, in milliseconds (None: not constrained)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def met_by(self, r: RequestResult) -> bool:
        if not r.ok:
            return False
        checks = (
            (self.ttft_ms, r.ttft),
            (self.tpot_ms, r.tpot),
            (self.e2e_ms, r.latency),
        )
        for limit_ms, value in checks:
            if limit_ms is None:
                continue
            # A request with one token has no TPOT; it cannot miss a TPOT objective.
            if value is not None and value * 1000 > limit_ms:
                return False
        return True


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _distribution_ms(values: Sequence[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {
        "mean": sum(values) / len(values) * 1000 if values else None,
    }
    for q in PERCENTILES:
        p = percentile(values, q)
        out[f"p{q}"] = p * 1000 if p is not None else None
    return out


def summarize(
    results: Sequence[RequestResult], duration_s: float, slo: Slo | None = None
) -> dict[str, object]:
    """The figures a report shows for one run: counts, rates and latency distributions."""
    ok = [r for r in results if r.ok]
    errors = [r for r in results if not r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    duration = max(duration_s, 1e-9)
    summary: dict[str, object] = {
        "requests": len(results),
        "completed": len(ok),
        "errors": len(errors),
        "error_rate": len(errors) / len(results) if results else 0.0,
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "output_tokens": out_tokens,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "short_answers": sum(1 for r in ok if r.output_tokens < r.expected_tokens),
        "ttft_ms": _distribution_ms([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": _distribution_ms([t for r in ok if (t := r.tpot) is not None]),
        "itl_ms": _distribution_ms([gap for r in ok for gap in r.itl]),
        "e2e_ms": _distribution_ms([r.latency for r in ok if r.latency is not None]),
        "error_samples": sorted({r.error for r in errors if r.error})[:5],
        # Refusals (429, 503, …) by status, and how long they took to come back: an
        # overloaded server should refuse fast, not hang.
        "errors_by_status": dict(Counter(str(r.status or "none") for r in errors)),
        "error_ms": _distribution_ms([r.latency for r in errors if r.latency is not None]),
    }
    if slo is not None:
        good = sum(1 for r in results if slo.met_by(r))
        summary["goodput"] = good / duration
        summary["slo"] = asdict(slo)
    return summary
