"""Results as JSON, Markdown tables and PNG plots."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Summary = Mapping[str, Any]


def _ms(summary: Summary, metric: str, stat: str) -> float | None:
    value = summary.get(metric, {}).get(stat)
    return float(value) if value is not None else None


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def load_label(summary: Summary) -> str:
    load = summary["load"]
    if load.get("concurrency") is not None:
        return f"c={load['concurrency']}"
    return f"{load['rate']} req/s"


def _errors_cell(s: Summary) -> str:
    """``121 (63.0%; 429×121 in p99 12 ms)``: how many failed, with which status, how fast."""
    cell = f"{s['errors']} ({100 * s['error_rate']:.1f}%"
    by_status = s.get("errors_by_status") or {}
    if by_status:
        kinds = ", ".join(f"{code}×{n}" for code, n in sorted(by_status.items()))
        cell += f"; {kinds} in p99 {_fmt(_ms(s, 'error_ms', 'p99'))} ms"
    return cell + ")"


def results_table(runs: Mapping[str, Sequence[Summary]]) -> str:
    """One row per server and load: rates, TTFT/TPOT/ITL/E2E percentiles (ms), errors."""
    header = (
        "| server | load | requests | req/s | output tok/s | TTFT p50 | TTFT p90 | TTFT p99 "
        "| TPOT p50 | TPOT p90 | TPOT p99 | ITL p50 | ITL p99 | E2E p50 | E2E p99 | errors |"
    )
    lines = [header, "|" + "---|" * 16]
    for label, summaries in runs.items():
        for s in summaries:
            cells = [
                label,
                load_label(s),
                str(s["requests"]),
                _fmt(s["request_throughput"], 2),
                _fmt(s["output_throughput"], 1),
                *(_fmt(_ms(s, "ttft_ms", p)) for p in ("p50", "p90", "p99")),
                *(_fmt(_ms(s, "tpot_ms", p)) for p in ("p50", "p90", "p99")),
                *(_fmt(_ms(s, "itl_ms", p)) for p in ("p50", "p99")),
                *(_fmt(_ms(s, "e2e_ms", p), 0) for p in ("p50", "p99")),
                _errors_cell(s),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


RATIO_METRICS = (
    ("output tok/s", "output_throughput", None),
    ("req/s", "request_throughput", None),
    ("TTFT p50", "ttft_ms", "p50"),
    ("TTFT p90", "ttft_ms", "p90"),
    ("TTFT p99", "ttft_ms", "p99"),
    ("TPOT p50", "tpot_ms", "p50"),
    ("TPOT p90", "tpot_ms", "p90"),
    ("TPOT p99", "tpot_ms", "p99"),
)


def _value(summary: Summary, key: str, stat: str | None) -> float | None:
    return float(summary[key]) if stat is None else _ms(summary, key, stat)


def ratios(candidate: Sequence[Summary], baseline: Sequence[Summary]) -> list[dict[str, Any]]:
    """candidate / baseline per load level and metric (throughput: higher is better;
    latencies: lower is better)."""
    out = []
    for cand, base in zip(candidate, baseline, strict=True):
        row: dict[str, Any] = {"load": load_label(cand)}
        for name, key, stat in RATIO_METRICS:
            c, b = _value(cand, key, stat), _value(base, key, stat)
            row[name] = c / b if c is not None and b else None
        out.append(row)
    return out


def ratio_table(rows: Sequence[Mapping[str, Any]], candidate: str, baseline: str) -> str:
    names = [name for name, _, _ in RATIO_METRICS]
    lines = [
        f"| {candidate} / {baseline} | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for row in rows:
        lines.append(f"| {row['load']} | " + " | ".join(_fmt(row[n], 3) for n in names) + " |")
    return "\n".join(lines)


def write_json(path: Path, payload: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def _style(ax: Any, title: str, legend_size: int) -> None:
    ax.set_title(title)
    ax.set_xlabel("concurrency")
    ax.set_xscale("log", base=2)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=legend_size)


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(runs: Mapping[str, Sequence[Summary]], out_dir: Path) -> list[Path]:
    """Latency and throughput against concurrency, one line per server."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    def series(summaries: Sequence[Summary], key: str, stat: str | None) -> tuple[list, list]:
        xs, ys = [], []
        for s in summaries:
            c = s["load"].get("concurrency")
            value = _value(s, key, stat)
            if c is not None and value is not None:
                xs.append(c)
                ys.append(value)
        return xs, ys

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (title, key, stats) in zip(
        axes,
        (
            ("TTFT (ms)", "ttft_ms", ("p50", "p99")),
            ("TPOT (ms)", "tpot_ms", ("p50", "p99")),
            ("end-to-end latency (ms)", "e2e_ms", ("p50", "p99")),
        ),
        strict=True,
    ):
        for label, summaries in runs.items():
            for stat, style in zip(stats, ("-o", "--x"), strict=True):
                xs, ys = series(summaries, key, stat)
                ax.plot(xs, ys, style, label=f"{label} {stat}")
        _style(ax, title, legend_size=7)
    paths.append(_save(plt, fig, out_dir / "latency.png"))

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (title, key) in zip(
        axes,
        (("output tokens/s", "output_throughput"), ("requests/s", "request_throughput")),
        strict=True,
    ):
        for label, summaries in runs.items():
            xs, ys = series(summaries, key, None)
            ax.plot(xs, ys, "-o", label=label)
        _style(ax, title, legend_size=8)
    paths.append(_save(plt, fig, out_dir / "throughput.png"))
    return paths
