"""The settings of `train METHOD` and `align`: the method config's defaults, then a settings
file (what the online loop hands its worker), then the flags."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from server.cli.main import build_parser
from server.cli.training import _align_hyperparameters, _method_config
from server.protocol import Hyperparameters
from server.training.preference import KtoConfig
from server.training.trainer import CutConfig

TRAIN = ["train", "cut", "--base", "b", "--data", "d.json", "--out", "o"]


def test_flags_override_the_settings_file_which_overrides_the_defaults(tmp_path: Path) -> None:
    settings = tmp_path / "hyperparameters.json"
    settings.write_text(json.dumps({"threshold": 1.2, "lora_r": 32, "lora_alpha": 64, "epochs": 3}))
    args = build_parser().parse_args([*TRAIN, "--hyperparameters", str(settings), "--epochs", "2"])
    config = _method_config(args)
    assert config == dataclasses.replace(
        CutConfig(), threshold=1.2, lora_r=32, lora_alpha=64, epochs=2
    )
    # Without a file: the defaults; a rank alone takes alpha with it.
    args = build_parser().parse_args([*TRAIN, "--lora-r", "8", "--target-modules", "up_proj"])
    assert _method_config(args) == dataclasses.replace(
        CutConfig(), lora_r=8, lora_alpha=8, target_modules=("up_proj",)
    )


def test_each_method_has_its_own_flags_and_defaults() -> None:
    args = build_parser().parse_args(
        ["train", "kto", "--base", "b", "--data", "d.json", "--out", "o", "--beta", "0.3"]
    )
    assert _method_config(args) == dataclasses.replace(KtoConfig(), beta=0.3)
    with pytest.raises(SystemExit):  # CUT's threshold is not a KTO setting
        build_parser().parse_args(["train", "kto", "--base", "b", "--data", "d", "--out", "o",
                                   "--threshold", "1.2"])  # fmt: skip


def test_a_config_survives_its_file_and_unknown_settings_are_refused(tmp_path: Path) -> None:
    config = dataclasses.replace(CutConfig(), warmup_steps=0, dtype="bfloat16", threads=2)
    path = tmp_path / "hyperparameters.json"
    config.to_json(path)
    assert CutConfig.from_json(path) == config
    path.write_text(json.dumps({"threshold": 1.1, "learning_rte": 1e-3}))
    with pytest.raises(ValueError, match="learning_rte"):
        CutConfig.from_json(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        CutConfig.from_json(path)


def test_align_sends_only_the_settings_given() -> None:
    args = build_parser().parse_args(
        ["align", "--model", "m", "--lr", "0.001", "--epochs", "2", "--dtype", "bfloat16"]
    )
    sent = _align_hyperparameters(args)
    assert sent == {"learning_rate": 0.001, "epochs": 2, "dtype": "bfloat16"}
    assert Hyperparameters(**sent).learning_rate == 0.001  # the server's model accepts them
    # Every method's settings are flags of `align`; the server refuses another method's.
    args = build_parser().parse_args(["align", "--model", "m", "--method", "kto", "--beta", "0.2"])
    assert _align_hyperparameters(args) == {"beta": 0.2} and args.method == "kto"
    # `--device` (offline iterations) picks a device; it is never a request setting.
    args = build_parser().parse_args(["align", "--model", "m", "--config", "x", "--device", "cpu"])
    assert _align_hyperparameters(args) == {}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["align", "--model", "m", "--target-modules", "up_proj"])


def test_bench_align_without_its_data_says_what_to_pass(
    test_env: dict[str, str], tmp_path: Path
) -> None:
    from tests.conftest import run_cli

    result = run_cli(["bench", "align", "--data", str(tmp_path / "absent.json")], test_env)
    assert result.returncode == 2
    assert "pass --data FILE: a CUT-format JSON list" in result.stderr
    assert "Traceback" not in result.stderr
