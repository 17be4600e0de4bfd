"""The platform decision, the sizes read from checkpoints and the resource plan: CUDA
deployments planned and checked on a machine without a GPU (the platform is injected)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.resources.plan import (
    GPU_ENGINE_OVERHEAD_GIB,
    EngineDemand,
    TrainingDemand,
    make_plan,
)
from server.resources.platform import (
    GIB,
    Gpu,
    Platform,
    PlatformError,
    apply_engine_environment,
    assumed_gpus,
    engine_core_preloaded,
    engine_defaults,
    engine_dtype,
    engine_environment,
    training_device,
)
from server.resources.reference import reference_shapes, sizing_markdown
from server.resources.sizing import read_shape, safetensors_bytes, training_memory

CPU = Platform(kind="cpu", ram_gib=24.0)
ONE_H100 = Platform(kind="cuda", ram_gib=256.0, gpus=(Gpu(0, 80.0),))
TWO_L40S = Platform(kind="cuda", ram_gib=256.0, gpus=(Gpu(0, 48.0), Gpu(1, 48.0)))


def demand(name: str, weights_gib: float, **kw: object) -> EngineDemand:
    """A 7B-like engine: 128 KiB of KV cache per token, 4,096-token context."""
    values: dict[str, object] = {
        "weights_bytes": int(weights_gib * GIB),
        "kv_bytes_per_token": 128 * 1024,
        "max_model_len": 4096,
    }
    values.update(kw)
    return EngineDemand(name=name, **values)  # type: ignore[arg-type]


# --- the platform decision -------------------------------------------------------------


def test_cpu_gets_todays_settings_and_cuda_gets_vllms_own() -> None:
    assert engine_environment(CPU, 2) == {
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    assert engine_defaults(CPU) == {"enforce_eager": True}
    # On CUDA: nothing CPU-only in the environment (the engine core stays in its own
    # process) and no engine argument overriding vLLM's CUDA graphs or prefix caching.
    assert engine_environment(ONE_H100, 2) == {}
    assert engine_defaults(ONE_H100) == {}
    # The engine core: forked from a process that imported vLLM during start-up on a CPU
    # (vLLM would spawn a fresh interpreter); on CUDA vLLM forks it from the gateway itself.
    assert engine_core_preloaded(CPU)
    assert not engine_core_preloaded(ONE_H100)


def test_auto_dtype_is_float32_on_a_cpu_and_vllms_choice_on_cuda() -> None:
    """On a CPU vLLM's bf16 answer depends on the instruction set (platform.engine_dtype);
    a models file's explicit dtype is kept on either."""
    assert engine_dtype("auto", CPU) == "float32"
    assert engine_dtype("auto", ONE_H100) == "auto"
    assert engine_dtype("bfloat16", CPU) == "bfloat16"
    assert engine_dtype("float16", ONE_H100) == "float16"


def test_raw_vllm_gets_the_gateways_platform_settings() -> None:
    from loadtest.servers import platform_flags

    assert platform_flags(CPU) == ["--enforce-eager", "--dtype", "float32"]
    assert platform_flags(ONE_H100) == []


def test_an_explicit_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    # Set, then removed: the undo removes what apply_engine_environment sets below (a
    # leftover VLLM_CPU_KVCACHE_SPACE would reach the gateways later tests start).
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "unset below")
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    applied = apply_engine_environment(CPU, 3)
    assert applied == {"VLLM_CPU_KVCACHE_SPACE": "3"}
    import os

    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"


def test_one_setting_sizes_the_cpu_kv_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """ALIGNGATE_CPU_KV_CACHE_GIB; vLLM's VLLM_CPU_KVCACHE_SPACE beside it must agree (it
    used to win silently, so the plan and vLLM could size different caches)."""
    from server.resources import platform

    monkeypatch.setattr(platform, "_OPERATORS_KV_CACHE", None)
    assert platform.effective_cpu_kv_cache_gib(3) == 3
    monkeypatch.setattr(platform, "_OPERATORS_KV_CACHE", "3")
    assert platform.effective_cpu_kv_cache_gib(3) == 3
    monkeypatch.setattr(platform, "_OPERATORS_KV_CACHE", "4")
    assert platform.effective_cpu_kv_cache_gib(2, ONE_H100) == 2  # sizes nothing on CUDA
    with pytest.raises(
        platform.PlatformError,
        match=r"VLLM_CPU_KVCACHE_SPACE=4 and ALIGNGATE_CPU_KV_CACHE_GIB=2 disagree",
    ):
        platform.effective_cpu_kv_cache_gib(2)


def test_training_device_selection() -> None:
    assert training_device("auto", CPU).torch_device == "cpu"
    assert training_device("auto", CPU).default_dtype == "float32"
    assert training_device("auto", ONE_H100).torch_device == "cuda:0"
    assert training_device("cuda", TWO_L40S).default_dtype == "bfloat16"
    assert training_device("cuda:1", TWO_L40S).cuda_index == 1
    assert training_device("cpu", ONE_H100).torch_device == "cpu"
    with pytest.raises(PlatformError, match="no CUDA device"):
        training_device("cuda", CPU)
    with pytest.raises(PlatformError, match="device 2 does not exist"):
        training_device("cuda:2", TWO_L40S)
    with pytest.raises(PlatformError, match="must be auto, cpu, cuda or cuda:N"):
        training_device("gpu", ONE_H100)


# --- sizes -------------------------------------------------------------------------------


def test_reference_parameter_counts_match_the_published_models() -> None:
    shapes = reference_shapes()
    assert shapes["LLaMA2-13B (CUT)"].parameters() == 13_015_864_320
    assert shapes["Mistral-7B (KTO)"].parameters() == 7_241_732_096
    assert round(shapes["CT-LLM-2B (DPO)"].parameters() / 1e9, 1) == 2.1
    assert round(shapes["GPT-J-6B (Quark)"].parameters() / 1e9, 2) == 6.05
    # KV cache per token, 16 bits: 2 × layers × kv heads × head dim × 2 bytes
    assert shapes["LLaMA2-13B (CUT)"].kv_bytes_per_token(2) == 2 * 40 * 40 * 128 * 2
    assert shapes["Mistral-7B (KTO)"].kv_bytes_per_token(2) == 2 * 32 * 8 * 128 * 2


def test_weights_are_read_from_safetensors_headers(default_model_path: Path) -> None:
    from safetensors import safe_open

    exact = 0
    for file in default_model_path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                tensor = f.get_tensor(name)
                exact += tensor.numel() * tensor.element_size()
    assert safetensors_bytes(default_model_path) == exact
    shape = read_shape(default_model_path)
    # SmolLM2-135M: tied embeddings, so the parameters are the stored tensors.
    assert shape.parameters() * 2 == exact


def test_gradient_checkpointing_shrinks_the_training_estimate() -> None:
    shape = reference_shapes()["LLaMA2-13B (CUT)"]
    plain = training_memory(shape, dtype_bytes=2)
    checkpointed = training_memory(shape, dtype_bytes=2, gradient_checkpointing=True)
    assert checkpointed.weights == plain.weights == shape.parameters() * 2
    assert checkpointed.activations < plain.activations / 5
    # LoRA r16 on gate/up/down: 40 layers × 16 × (3 × (5120 + 13824)); 16 bytes each.
    assert plain.lora_state == 40 * 16 * 3 * (5120 + 13824) * 16


# --- the plan ------------------------------------------------------------------------------


def test_engines_sharing_a_gpu_split_it_by_demand_and_start_one_by_one() -> None:
    big, small = demand("big", 14.0), demand("small", 4.0)
    plan = make_plan([big, small], ONE_H100)
    assert plan.ok, plan.problems
    shares = {e.name: e for e in plan.engines}
    # All of the usable 0.90 × 80 GiB is shared out, in proportion to demand.
    assert sum(e.share_gib for e in plan.engines) == pytest.approx(72.0)
    ratio = shares["big"].share_gib / shares["small"].share_gib
    assert ratio == pytest.approx(big.demand_gib / small.demand_gib)
    assert sum(e.gpu_memory_utilization or 0 for e in plan.engines) <= 0.90
    for e in plan.engines:
        assert e.devices == (0,)
        assert e.engine_args() == {"gpu_memory_utilization": e.gpu_memory_utilization}
        assert e.environment() == {"CUDA_VISIBLE_DEVICES": "0"}
        # The KV cache is what the share leaves after weights and overhead.
        assert e.kv_cache_gib == pytest.approx(
            e.share_gib - e.weights_gib - GPU_ENGINE_OVERHEAD_GIB
        )
    assert plan.start_groups == [["big"], ["small"]]


def test_a_floor_keeps_a_small_engine_startable() -> None:
    # The small engine's proportional share would be below weights + one sequence.
    huge = demand("huge", 40.0, kv_cache_tokens=200_000)
    tiny = demand("tiny", 0.5, kv_cache_tokens=4096)
    plan = make_plan([huge, tiny], ONE_H100)
    assert plan.ok, plan.problems
    assert plan.engine("tiny").share_gib >= tiny.floor_gib - 1e-9
    assert plan.engine("tiny").kv_tokens >= 4096


def test_explicit_shares_are_kept_and_the_rest_is_divided() -> None:
    plan = make_plan(
        [demand("fixed", 14.0, memory_fraction=0.30), demand("gib", 4.0, memory_gib=10.0),
         demand("auto", 4.0)],
        ONE_H100,
    )  # fmt: skip
    assert plan.ok, plan.problems
    assert plan.engine("fixed").share_gib == pytest.approx(24.0)
    assert plan.engine("fixed").gpu_memory_utilization == pytest.approx(0.30)
    assert plan.engine("fixed").explicit
    assert plan.engine("gib").gpu_memory_utilization == pytest.approx(10 / 80, abs=1e-4)
    assert plan.engine("auto").share_gib == pytest.approx(72.0 - 24.0 - 10.0)
    assert not plan.engine("auto").explicit


def test_an_over_committed_gpu_is_refused_with_names_and_figures() -> None:
    plan = make_plan([demand("llama-13b", 24.2), demand("mistral-7b", 13.5)], assumed_gpus(24))
    assert not plan.ok
    (problem,) = plan.problems
    assert "GPU 0 (24.0 GiB) is over-committed" in problem
    assert "llama-13b ≥" in problem and "mistral-7b ≥" in problem
    assert "usable 21.6 GiB (0.90 of the card)" in problem

    given = make_plan(
        [demand("a", 4.0, memory_fraction=0.6), demand("b", 4.0, memory_fraction=0.5)], ONE_H100
    )
    assert not given.ok and "a 48.0 GiB (given), b 40.0 GiB (given)" in given.problems[0]

    below = make_plan([demand("starved", 14.0, memory_gib=8.0)], ONE_H100)
    assert not below.ok and "below its floor" in below.problems[0]


def test_the_training_reserve_is_kept_on_the_training_gpu() -> None:
    reserve = TrainingDemand(device="auto", needed_bytes=int(20 * GIB), model="m")
    plan = make_plan([demand("m", 14.0, lora_slots=2, lora_slot_bytes=80 * 2**20)],
                     ONE_H100, training=reserve)  # fmt: skip
    assert plan.ok, plan.problems
    assert plan.training is not None and plan.training.device == "cuda:0"
    assert plan.training.reserve_gib == pytest.approx(20.0)
    assert plan.engine("m").share_gib == pytest.approx(72.0 - 20.0)
    assert plan.engine("m").lora_gib == pytest.approx(160 / 1024)

    # Two GPUs, auto: the loop trains on the last one and the engines keep off it.
    two = make_plan([demand("a", 14.0), demand("b", 14.0)], TWO_L40S, training=reserve)
    assert two.ok, two.problems
    assert two.training is not None and two.training.device == "cuda:1"
    assert {e.devices for e in two.engines} == {(0,)}

    # A stated reserve too small for the estimate is refused, with the numbers.
    small = TrainingDemand(device="cuda:0", reserve_gib=8.0, needed_bytes=int(20 * GIB),
                           model="m", breakdown="weights 13.5 + …")  # fmt: skip
    refused = make_plan([demand("m", 14.0)], ONE_H100, training=small)
    assert not refused.ok
    assert "reserve 8.0 GiB cannot hold m's CUT run, ~20.0 GiB" in refused.problems[0]


def test_tensor_parallel_devices() -> None:
    plan = make_plan([demand("llama-70b", 60.0, devices=(0, 1))], TWO_L40S)
    assert plan.ok, plan.problems
    e = plan.engine("llama-70b")
    assert e.engine_args()["tensor_parallel_size"] == 2
    assert e.environment() == {"CUDA_VISIBLE_DEVICES": "0,1"}
    # Half the weights on each card: 0.9 × 48 − 30 − overhead left for the cache on each.
    assert e.kv_cache_gib == pytest.approx(2 * (0.9 * 48 - 30 - GPU_ENGINE_OVERHEAD_GIB))

    missing = make_plan([demand("x", 1.0, devices=(0, 3))], TWO_L40S)
    assert not missing.ok and "CUDA device 3 does not exist" in missing.problems[0]


def test_cpu_plan_shows_each_kv_cache_against_ram() -> None:
    plan = make_plan([demand("a", 0.25), demand("b", 0.25)], CPU, cpu_kv_cache_gib=2)
    assert plan.ok, plan.problems
    assert all(e.kv_cache_gib == 2 and e.gpu_memory_utilization is None for e in plan.engines)
    assert plan.engine("a").kv_tokens == 2 * GIB // (128 * 1024)
    assert plan.start_groups == [["a", "b"]]  # CPU engines start side by side
    crowded = make_plan([demand(f"m{i}", 0.25) for i in range(8)], CPU, cpu_kv_cache_gib=2)
    assert not crowded.ok and "RAM is over-committed" in crowded.problems[0]


def test_the_sizing_table_is_the_planners() -> None:
    table = sizing_markdown()
    assert table.count("\n") == 5  # header, rule, four models
    row = next(line for line in table.splitlines() if line.startswith("| LLaMA2-13B"))
    assert "| — | — | — |" in row  # 13B in bf16 does not fit a 24 GB card


# --- the models file and `aligngate check` -----------------------------------------------


def test_check_plans_the_four_families_on_this_cpu_and_on_an_assumed_gpu(
    test_env: dict[str, str], tmp_path: Path
) -> None:
    from tests.conftest import REPO, run_cli

    families = str(REPO / "examples" / "families.yaml")
    cpu = run_cli(["check", "--config", families], test_env)
    assert cpu.returncode == 0, cpu.stderr
    assert "platform: CPU" in cpu.stdout
    assert cpu.stdout.count("| smollm2-") == 4

    gpu = run_cli(["check", "--config", families, "--gpu-memory-gib", "80", "--json"], test_env)
    assert gpu.returncode == 0, gpu.stderr
    plan = json.loads(gpu.stdout)
    assert plan["ok"] and len(plan["engines"]) == 4
    assert sum(e["gpu_memory_utilization"] for e in plan["engines"]) <= 0.9
    assert plan["start_groups"] == [[e["name"]] for e in plan["engines"]]

    crowded = tmp_path / "crowded.yaml"
    crowded.write_text(
        "models:\n"
        "  - {name: a, path: builtin:smollm2-135m-instruct, gpu_memory_utilization: 0.6}\n"
        "  - {name: b, path: builtin:smollm2-135m-instruct, gpu_memory_utilization: 0.6}\n"
    )
    refused = run_cli(["check", "--config", str(crowded), "--gpu-memory-gib", "80"], test_env)
    assert refused.returncode == 1
    assert "GPU 0 (80.0 GiB) is over-committed" in refused.stdout

    invalid = tmp_path / "invalid.yaml"
    invalid.write_text(
        "models:\n  - {name: a, path: builtin:smollm2-135m-instruct,"
        " gpu_memory_utilization: 0.5, gpu_memory_gib: 10}\n"
    )
    bad = run_cli(["check", "--config", str(invalid)], test_env)
    assert bad.returncode == 2
    assert "gpu_memory_utilization or gpu_memory_gib" in bad.stderr


NVIDIA_SMI = """0, GPU-aaaa, 81559, NVIDIA H100 80GB HBM3
1, GPU-bbbb, 81559, NVIDIA H100 80GB HBM3
2, GPU-cccc, 46068, NVIDIA L40S
"""


def test_gpus_are_read_without_a_cuda_context_and_respect_cuda_visible_devices() -> None:
    from server.resources.platform import visible_gpus

    every = visible_gpus(NVIDIA_SMI, None)
    assert [(g.index, g.visible_id, round(g.total_gib, 1)) for g in every] == [
        (0, "0", 79.6), (1, "1", 79.6), (2, "2", 45.0)
    ]  # fmt: skip
    # The gateway itself restricted to GPUs 2 and 0 (by index or UUID): they are its 0 and
    # 1, and an engine planned on its device 0 must be started with CUDA_VISIBLE_DEVICES=2.
    some = visible_gpus(NVIDIA_SMI, "2,GPU-aaaa")
    assert [(g.index, g.visible_id, g.name) for g in some] == [
        (0, "2", "NVIDIA L40S"), (1, "GPU-aaaa", "NVIDIA H100 80GB HBM3")
    ]  # fmt: skip
    platform = Platform(kind="cuda", ram_gib=64, gpus=some)
    plan = make_plan([demand("m", 4.0)], platform)
    assert plan.ok and plan.engine("m").devices in ((0,), (1,))
    placed = plan.engine("m")
    assert placed.environment() == {"CUDA_VISIBLE_DEVICES": some[placed.devices[0]].visible_id}
    assert visible_gpus(NVIDIA_SMI, "7,0") == ()  # CUDA stops at the first unusable entry
