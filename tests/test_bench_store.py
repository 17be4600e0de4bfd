"""The store benchmark runs and reports both runs (figures live in the README, not here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_bench_store_reports_baseline_and_group_commit(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "bench",
            "store",
            "--writes",
            "200",
            "--concurrency",
            "16",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert [(r["backend"], r["concurrency"], r["writes"]) for r in rows] == [
        ("sqlite", 1, 300),
        ("sqlite", 16, 200),
    ]
    assert all(r["writes_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] for r in rows)
    assert "speedup_vs_commit_per_write" in rows[1]
    assert "acked writes/s" in result.stdout
