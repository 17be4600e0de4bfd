"""Where training runs: the device decision (injected platforms, so the CUDA branch is
covered here), clear refusals where a GPU is asked for and absent, the server's iterations
placed by the resource plan, and the CPU path of the same code trained for real."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from server.errors import InvalidRequest
from server.models.adapter_meta import META_FILE
from server.resources.plan import TrainingDemand, make_plan
from server.resources.platform import (
    GIB,
    Gpu,
    Platform,
    PlatformError,
    assumed_gpus,
)
from server.training.service import placed_by_plan
from server.training.trainer import (
    CutConfig,
    TrainingMemoryError,
    check_fits,
    memory_needed,
    placed,
    train_cut_adapter,
)
from tests.conftest import run_cli

CPU = Platform(kind="cpu", ram_gib=24.0)
TWO_GPUS = Platform(kind="cuda", ram_gib=128.0, gpus=(Gpu(0, 80.0), Gpu(1, 80.0)))

# A few judged and fine Alpaca records, enough for a tiny model's training step.
RECORDS = [
    {"id": 1, "instruction": "Name a primary colour.", "input": "", "output": "Green.",
     "judgment": "Green is not a primary colour of paint; red, yellow or blue are."},
    {"id": 2, "instruction": "What is 2 + 2?", "input": "", "output": "4.", "judgment": None},
    {"id": 3, "instruction": "Spell 'cat' backwards.", "input": "", "output": "tca.",
     "judgment": "The letters are in the wrong order: it is 'tac'."},
    {"id": 4, "instruction": "Capital of Italy?", "input": "", "output": "Rome.",
     "judgment": None},
]  # fmt: skip


def test_auto_means_the_gpu_in_bfloat16_where_there_is_one() -> None:
    on_cpu = placed(CutConfig(), CPU)
    assert (on_cpu.device, on_cpu.dtype) == ("cpu", "float32")
    on_gpu = placed(CutConfig(), TWO_GPUS)
    assert (on_gpu.device, on_gpu.dtype) == ("cuda:0", "bfloat16")
    second = placed(CutConfig(device="cuda:1", dtype="float32"), TWO_GPUS)
    assert (second.device, second.dtype) == ("cuda:1", "float32")
    with pytest.raises(PlatformError, match="no CUDA device"):
        placed(CutConfig(device="cuda"), CPU)


def test_a_run_that_does_not_fit_is_refused_with_the_numbers(tiny_dir: Path) -> None:
    config = placed(CutConfig(device="cuda:0", cutoff=512), TWO_GPUS)
    needed = memory_needed(tiny_dir / "llama", config)
    check_fits(needed, needed.total, "cuda:0")  # exactly enough
    with pytest.raises(TrainingMemoryError, match=r"cuda:0 has 0\.0 GiB free; .* needs ~"):
        check_fits(needed, 1024, "cuda:0")
    checkpointed = memory_needed(
        tiny_dir / "llama", dataclasses.replace(config, gradient_checkpointing=True)
    )
    assert checkpointed.activations < needed.activations


def test_the_server_trains_where_the_plan_says_and_refuses_past_the_reserve(
    tiny_dir: Path,
) -> None:
    base = tiny_dir / "llama"
    small = memory_needed(base, placed(CutConfig(device="cuda:0"), TWO_GPUS))

    def plan(reserve_gib: float | None, checkpointing: bool = False):  # type: ignore[no-untyped-def]
        training = TrainingDemand(
            device="auto",
            reserve_gib=reserve_gib,
            needed_bytes=small.total,
            model="tiny",
            gradient_checkpointing=checkpointing,
        )
        return make_plan([], TWO_GPUS, training=training)

    config = placed_by_plan(CutConfig(), plan(None, checkpointing=True), base)
    # Two GPUs: the loop trains on the last one, in bfloat16, as the plan says.
    assert (config.device, config.dtype, config.gradient_checkpointing) == (
        "cuda:1",
        "bfloat16",
        True,
    )
    with pytest.raises(InvalidRequest, match=r"more than the training reserve of 0\.1 GiB"):
        placed_by_plan(CutConfig(cutoff=2048), plan(0.1), base)
    # No plan (no server), or a CPU plan: the config decides.
    assert placed_by_plan(CutConfig(), None, base) == CutConfig()
    cpu_plan = make_plan([], CPU, training=TrainingDemand(needed_bytes=GIB))
    assert placed_by_plan(CutConfig(), cpu_plan, base).device == "cpu"


def test_asking_for_a_missing_gpu_is_one_line_and_exit_status_2(
    test_env: dict[str, str], tmp_path: Path
) -> None:
    data = tmp_path / "cut.json"
    data.write_text(json.dumps(RECORDS))
    commands = [
        ["train", "cut", "--base", str(tmp_path), "--data", str(data),
         "--out", str(tmp_path / "out"), "--device", "cuda"],
        ["merge", "--base", str(tmp_path), "--adapter", str(tmp_path), "--out",
         str(tmp_path / "m"), "--device", "cuda:0"],
    ]  # fmt: skip
    for args in commands:
        result = run_cli(args, test_env, timeout=120)
        assert result.returncode == 2, result.stderr
        assert "no CUDA device on this machine" in result.stderr
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    server = run_cli(["align", "--model", "m", "--device", "cuda"], test_env, timeout=60)
    assert server.returncode == 2 and "--device needs --config" in server.stderr


def test_cpu_training_records_its_device_and_checkpointing_changes_no_loss(
    tiny_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "cut.json"
    data.write_text(json.dumps(RECORDS))
    config = CutConfig(device="cpu", warmup_steps=0, batch_size=2, lora_dropout=0.0)
    losses = {}
    for checkpointing in (False, True):
        out = tmp_path / f"gc-{checkpointing}"
        _, report, _ = train_cut_adapter(
            base=tiny_dir / "llama",
            data=data,
            out=out,
            config=dataclasses.replace(config, gradient_checkpointing=checkpointing),
            family="cut",
        )
        meta = json.loads((out / META_FILE).read_text())
        assert meta["hyperparameters"]["device"] == "cpu"
        assert meta["hyperparameters"]["dtype"] == "float32"  # auto, on a CPU
        assert meta["hyperparameters"]["gradient_checkpointing"] is checkpointing
        losses[checkpointing] = report.losses
    # Recomputing activations is exact: the same losses, step for step.
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_assumed_gpus_are_a_plan_not_a_device() -> None:
    platform = assumed_gpus(80, count=2)
    assert platform.assumed and [g.index for g in platform.gpus] == [0, 1]
    with pytest.raises(PlatformError):
        assumed_gpus(0)


def test_warm_up_is_a_fraction_of_the_run() -> None:
    from server.training.trainer import warmup_for

    config = CutConfig()  # CUT's 100 steps at most, 0.1 of the run
    assert warmup_for(config, 8) == 0  # a small online window trains from its first step
    assert warmup_for(config, 125) == 12
    assert warmup_for(config, 5000) == 100  # long runs keep CUT's 100 steps
    assert warmup_for(dataclasses.replace(config, warmup_ratio=0.0), 5000) == 0


def test_small_windows_move_the_model_and_the_job_reports_by_how_much(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """With the defaults (batch 8, warm-up 100 steps before) 8 records never left warm-up and
    no logit moved; now the run reports the adapter's effect on its own judged tokens."""
    from tests.data import write_cut_records

    data = write_cut_records(tmp_path / "cut.json", 8)
    _, report, dataset = train_cut_adapter(
        base=tiny_dir / "llama",
        data=data,
        out=tmp_path / "adapter",
        config=CutConfig(device="cpu", learning_rate=1e-2, epochs=3),
        family="cut",
    )
    assert report.warmup_steps == 0
    effect = report.effect
    assert effect is not None and effect["examples"] == dataset.judged > 0
    flagged, unflagged = effect["flagged"], effect["unflagged"]
    assert flagged["tokens"] > 0 and unflagged["tokens"] > 0
    assert abs(unflagged["delta"]) > 1e-3  # the adapter moved its own tokens
    # Unlikelihood on the flagged tokens, likelihood on the rest: the flagged ones gain less
    # (this random model's every token is unlikely, so both rise; the default model's
    # flagged tokens fall, see test_training.py's evidence test).
    assert flagged["delta"] < unflagged["delta"]
    meta = json.loads((tmp_path / "adapter" / META_FILE).read_text())
    assert meta["train"]["effect"] == effect
