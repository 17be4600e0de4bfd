"""The embedded default model: converted once, reused, never half-written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from server.models.default_model import MARKER, cached_path, ensure_default_model
from tests.conftest import REPO, TEST_HOME


def test_conversion_is_a_servable_bf16_checkpoint(default_model_path: Path) -> None:
    config = json.loads((default_model_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "bfloat16"
    assert "quantization_config" not in config
    assert config["hidden_size"] == 576 and config["num_hidden_layers"] == 30
    assert (default_model_path / "model.safetensors").stat().st_size > 250_000_000
    assert (default_model_path / MARKER).is_file()


def test_second_run_reuses_the_cache(default_model_path: Path) -> None:
    weights = default_model_path / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert ensure_default_model(default_model_path.parent) == default_model_path
    assert weights.stat().st_mtime_ns == before
    assert cached_path(default_model_path.parent) == default_model_path


def test_cli_prints_the_folder(default_model_path: Path) -> None:
    env = dict(os.environ, ALIGNGATE_HOME=str(TEST_HOME))
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "default-model"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        check=True,
        timeout=300,
    )
    assert out.stdout.strip().splitlines()[-1] == str(default_model_path)


@pytest.mark.slow
def test_half_written_conversion_is_not_reused(default_model_path: Path, tmp_path: Path) -> None:
    # A folder under the final name without the completion marker (a crash mid-write).
    partial = tmp_path / default_model_path.name
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    assert cached_path(tmp_path) is None
    result = ensure_default_model(tmp_path)
    assert result == partial
    assert (result / MARKER).is_file()
    assert json.loads((result / "config.json").read_text())["model_type"] == "llama"
    # No temporary folders are left behind.
    assert [p.name for p in tmp_path.iterdir()] == [partial.name]
    shutil.rmtree(result)
