"""``python -m loadtest gate-power``: does the promotion gate tell a better model from an
equal one? A simulation of the gate's decision at its default size, checked against the
gateway's own rule (``aligngate gate decide``, one process fed every simulated run):

- false promotion: a candidate exactly as good as the incumbent (win rate 0.50) with a
  share of ties from 0 to 60 %: promoted at most 5 % of the time;
- power: a candidate with a true win rate of 0.60 and 30 % ties: promoted at least 80 % of
  the time.

Each run draws ``size`` independent outcomes (win, loss, tie) and asks the rule.

Owns: the simulation and its table. Does not know: the rule (it asks the CLI).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

NULL_TIES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
POWER_POINT = (0.60, 0.30)  # (true win rate, ties half; share of ties)
MAX_FALSE_PROMOTION = 0.05
MIN_POWER = 0.80


@dataclass(frozen=True)
class Point:
    win_rate: float
    ties: float

    @property
    def probabilities(self) -> tuple[float, float, float]:
        p_win = self.win_rate - self.ties / 2
        return p_win, 1 - self.ties - p_win, self.ties


def _gate(args: list[str], lines: list[str] | None = None) -> list[dict[str, Any]]:
    """``aligngate gate ARGS`` (this interpreter), ``lines`` on stdin; its JSON lines."""
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "gate", *args],
        input="".join(lines or []),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"aligngate gate {' '.join(args)} failed: {result.stderr[-2000:]}")
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def simulate(runs: int = 10_000, seed: int = 0, size: int | None = None) -> dict[str, Any]:
    defaults = _gate(["decide", "--defaults"])[0]
    size = size or int(defaults["size"])
    rng = np.random.default_rng(seed)
    points = [Point(0.5, t) for t in NULL_TIES] + [Point(*POWER_POINT)]
    lines: list[str] = []
    for point in points:
        counts = rng.multinomial(size, point.probabilities, size=runs)
        lines += [
            json.dumps({"wins": int(w), "losses": int(lo), "ties": int(t)}) + "\n"
            for w, lo, t in counts
        ]
    decisions = _gate(["decide"], lines)
    promoted = np.array([d["promoted"] for d in decisions], dtype=bool).reshape(len(points), runs)
    rates = promoted.mean(axis=1)
    false_promotion = {
        f"{p.ties:.1f}": round(float(r), 4)
        for p, r in zip(points, rates, strict=True)
        if p.win_rate == 0.5
    }
    power = round(float(rates[-1]), 4)
    worst = max(false_promotion.values())
    return {
        "size": size,
        "runs": runs,
        "rule": {k: v for k, v in defaults.items() if k != "size"},
        "false_promotion": false_promotion,  # by share of ties, at a true win rate of 0.50
        "max_false_promotion": worst,
        "power": power,  # at a true win rate of 0.60 with 30 % ties
        "power_point": {"win_rate": POWER_POINT[0], "ties": POWER_POINT[1]},
        "ok": worst <= MAX_FALSE_PROMOTION and power >= MIN_POWER,
    }


def markdown(result: dict[str, Any]) -> str:
    rows = [
        f"Gate at its defaults ({result['rule']['mode']}, {result['size']} items), "
        f"{result['runs']:,} simulated runs per row:",
        "",
        "| true win rate | ties | promoted |",
        "|---|---|---|",
    ]
    for ties, rate in result["false_promotion"].items():
        rows.append(f"| 0.50 | {float(ties):.0%} | {rate:.2%} (false promotion) |")
    point = result["power_point"]
    rows.append(
        f"| {point['win_rate']:.2f} | {point['ties']:.0%} | {result['power']:.2%} (power) |"
    )
    return "\n".join(rows)
