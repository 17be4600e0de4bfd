"""``aligngate --version``: the gateway's version and the vLLM build under it (as
``vllm --version`` answers), without starting anything."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys


def test_version_names_the_gateway_and_its_vllm() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert line.startswith(f"aligngate {importlib.metadata.version('aligngate')} (")
    assert "vllm" in line and "no vLLM" not in line, line
