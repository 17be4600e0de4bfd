"""The platform the gateway runs on, and the defaults that follow from it.

Decided here and only here: which environment vLLM gets (CPU: the KV-cache size and the
engine core in-process; CUDA: nothing, so vLLM's multiprocess engine core, CUDA graphs and
prefix caching apply), which engine arguments differ by platform, and where training runs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Literal

GIB = 1024**3


@dataclass(frozen=True, slots=True)
class Gpu:
    index: int
    total_gib: float
    name: str = "GPU"


@dataclass(frozen=True, slots=True)
class Platform:
    """What the gateway can use: the CPU's memory, and CUDA devices if any."""

    kind: Literal["cpu", "cuda"]
    ram_gib: float
    gpus: tuple[Gpu, ...] = field(default_factory=tuple)
    # True when the GPUs were described (``--gpu-memory-gib``), not detected.
    assumed: bool = False

    @property
    def on_cuda(self) -> bool:
        return self.kind == "cuda"

    def gpu(self, index: int) -> Gpu:
        for gpu in self.gpus:
            if gpu.index == index:
                return gpu
        raise PlatformError(
            f"CUDA device {index} does not exist (devices: "
            f"{', '.join(str(g.index) for g in self.gpus) or 'none'})"
        )


class PlatformError(ValueError):
    """A device asked for that this platform does not have."""


def _ram_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError):
        return 0.0


def detect() -> Platform:
    """The real platform: CUDA devices as torch sees them, else the CPU."""
    import torch

    ram = _ram_gib()
    if not torch.cuda.is_available():
        return Platform(kind="cpu", ram_gib=ram)
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append(Gpu(index=index, total_gib=props.total_memory / GIB, name=props.name))
    return Platform(kind="cuda", ram_gib=ram, gpus=tuple(gpus))


def assumed_gpus(memory_gib: float, count: int = 1, ram_gib: float | None = None) -> Platform:
    """A CUDA platform described rather than detected: plan a deployment on a laptop."""
    if memory_gib <= 0 or count < 1:
        raise PlatformError("a GPU needs a positive memory size")
    gpus = tuple(Gpu(index=i, total_gib=memory_gib, name="assumed") for i in range(count))
    return Platform(kind="cuda", ram_gib=ram_gib or _ram_gib(), gpus=gpus, assumed=True)


def engine_environment(platform: Platform, cpu_kv_cache_gib: float) -> dict[str, str]:
    """Environment variables vLLM reads at engine start, by platform.

    CPU: the KV cache per engine (``VLLM_CPU_KVCACHE_SPACE``) and the engine core inside the
    gateway process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: ~5 s start instead of ~25 s and
    faster decoding on a few cores, DESIGN.md §5). CUDA: nothing; vLLM's multiprocess engine
    core keeps its scheduler off the HTTP process's GIL.
    """
    if platform.on_cuda:
        return {}
    return {
        "VLLM_CPU_KVCACHE_SPACE": f"{cpu_kv_cache_gib:g}",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }


def effective_cpu_kv_cache_gib(setting: float) -> float:
    """The KV cache each CPU engine gets: ``VLLM_CPU_KVCACHE_SPACE`` where the environment
    sets it (it wins over the setting), else the setting."""
    try:
        return float(os.environ["VLLM_CPU_KVCACHE_SPACE"])
    except (KeyError, ValueError):
        return setting


def apply_engine_environment(platform: Platform, cpu_kv_cache_gib: float) -> dict[str, str]:
    """Set ``engine_environment`` where the environment does not already say otherwise;
    returns what was set."""
    applied = {}
    for name, value in engine_environment(platform, cpu_kv_cache_gib).items():
        if name not in os.environ:
            os.environ[name] = value
            applied[name] = value
    return applied


def engine_defaults(platform: Platform) -> dict[str, object]:
    """vLLM engine arguments that differ by platform (a models file's `engine_args` win).

    CPU: eager mode (torch.compile costs ~90 s of start-up for no gain at 135M here).
    CUDA: vLLM's own defaults: CUDA graphs, prefix caching.
    """
    if platform.on_cuda:
        return {}
    return {"enforce_eager": True}


@dataclass(frozen=True, slots=True)
class TrainingDevice:
    """Where the trainer runs and in which precision by default."""

    torch_device: str  # "cpu" or "cuda:N"
    default_dtype: str  # bfloat16 on GPUs, float32 on CPUs

    @property
    def cuda_index(self) -> int | None:
        return int(self.torch_device.split(":")[1]) if self.torch_device != "cpu" else None


_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def training_device(requested: str, platform: Platform) -> TrainingDevice:
    """``auto`` → the first CUDA device when there is one, else the CPU; ``cuda`` → device 0.
    Asking for CUDA where there is none is a ``PlatformError``."""
    if not _DEVICE.match(requested):
        raise PlatformError(f"--device must be auto, cpu, cuda or cuda:N, not {requested!r}")
    if requested == "cpu" or (requested == "auto" and not platform.on_cuda):
        return TrainingDevice(torch_device="cpu", default_dtype="float32")
    if not platform.on_cuda or not platform.gpus:
        raise PlatformError(f"--device {requested}: no CUDA device on this machine")
    index = platform.gpus[0].index if requested in ("auto", "cuda") else int(requested[5:])
    platform.gpu(index)  # refuses an index that does not exist
    return TrainingDevice(torch_device=f"cuda:{index}", default_dtype="bfloat16")
