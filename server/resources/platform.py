"""The platform the gateway runs on, and the defaults that follow from it.

Decided here and only here: which environment vLLM gets (CPU: the KV-cache size and the
engine core in-process; CUDA: nothing, so vLLM's multiprocess engine core, CUDA graphs and
prefix caching apply), which engine arguments differ by platform, and where training runs.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from typing import Literal

GIB = 1024**3


@dataclass(frozen=True, slots=True)
class Gpu:
    index: int  # as this process sees it (0, 1, … under CUDA_VISIBLE_DEVICES)
    total_gib: float
    name: str = "GPU"
    # What CUDA_VISIBLE_DEVICES must name for a child process to see this GPU (the physical
    # index, or the UUID/index the parent's own CUDA_VISIBLE_DEVICES gave); None: ``index``.
    visible_as: str | None = None

    @property
    def visible_id(self) -> str:
        return self.visible_as if self.visible_as is not None else str(self.index)


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
    """The real platform: CUDA devices where this torch is a CUDA build and sees any, else
    the CPU. Memory sizes come from ``nvidia-smi``, never from a CUDA context: a context in
    the gateway's own process would hold GPU memory no plan counts and make vLLM spawn its
    workers (it must when the parent has initialised CUDA)."""
    import torch

    ram = _ram_gib()
    if torch.version.cuda is None or not torch.cuda.is_available():
        return Platform(kind="cpu", ram_gib=ram)
    listed = _nvidia_smi()
    if listed is not None:
        gpus = visible_gpus(listed, os.environ.get("CUDA_VISIBLE_DEVICES"))
    else:  # no nvidia-smi: ask torch (this initialises CUDA in this process)
        gpus = tuple(
            Gpu(i, torch.cuda.get_device_properties(i).total_memory / GIB)
            for i in range(torch.cuda.device_count())
        )
    return Platform(kind="cuda", ram_gib=ram, gpus=gpus)


def _nvidia_smi() -> str | None:
    try:
        return subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=index,uuid,memory.total,name",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def visible_gpus(listing: str, cuda_visible_devices: str | None) -> tuple[Gpu, ...]:
    """``nvidia-smi --query-gpu=index,uuid,memory.total,name`` lines, as this process sees
    them: in ``CUDA_VISIBLE_DEVICES``'s order (indices or UUIDs), numbered from 0, each
    remembering what a child's CUDA_VISIBLE_DEVICES must name to see it."""
    physical = []
    for line in listing.strip().splitlines():
        index, uuid, mib, name = (part.strip() for part in line.split(",", 3))
        physical.append((index, uuid, float(mib) / 1024, name))
    if cuda_visible_devices is None:
        return tuple(
            Gpu(i, gib, name, visible_as=index) for i, (index, _, gib, name) in enumerate(physical)
        )
    gpus = []
    for wanted in (w.strip() for w in cuda_visible_devices.split(",") if w.strip()):
        match = next((p for p in physical if wanted in (p[0], p[1])), None)
        if match is None:
            break  # CUDA stops at the first entry it cannot use
        gpus.append(Gpu(len(gpus), match[2], match[3], visible_as=wanted))
    return tuple(gpus)


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
    faster decoding on a few cores; docs/operations/settings.md). CUDA: nothing; vLLM's
    multiprocess engine core keeps its scheduler off the HTTP process's GIL.
    """
    if platform.on_cuda:
        return {}
    return {
        "VLLM_CPU_KVCACHE_SPACE": f"{cpu_kv_cache_gib:g}",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }


# vLLM's own variable, as this process found it (the gateway sets it itself, from the setting).
_OPERATORS_KV_CACHE = os.environ.get("VLLM_CPU_KVCACHE_SPACE")


def effective_cpu_kv_cache_gib(setting: float, platform: Platform | None = None) -> float:
    """The KV cache each CPU engine gets: ``ALIGNGATE_CPU_KV_CACHE_GIB`` (``setting``). One
    setting sizes it: vLLM's ``VLLM_CPU_KVCACHE_SPACE``, when the environment sets it too,
    must say the same, or it is a ``PlatformError`` naming both (it used to win silently,
    and the resource plan and vLLM could then disagree). On CUDA (``platform``) neither
    sizes anything, and a stray variable is no error."""
    if _OPERATORS_KV_CACHE is None or (platform is not None and platform.on_cuda):
        return setting
    try:
        same = float(_OPERATORS_KV_CACHE) == float(setting)
    except ValueError:
        same = False
    if not same:
        raise PlatformError(
            f"VLLM_CPU_KVCACHE_SPACE={_OPERATORS_KV_CACHE} and ALIGNGATE_CPU_KV_CACHE_GIB="
            f"{setting:g} disagree: the gateway sizes each CPU engine's KV cache from "
            "ALIGNGATE_CPU_KV_CACHE_GIB (and sets VLLM_CPU_KVCACHE_SPACE from it); set that "
            "one and unset VLLM_CPU_KVCACHE_SPACE"
        )
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


def engine_core_preloaded(platform: Platform) -> bool:
    """Whether a local engine's core process forks from a process that imported vLLM while
    the gateway started (``engine.core_process``). CPU: yes — vLLM spawns the core there,
    and the fresh interpreter spends ~13 s re-importing vLLM. CUDA: no — vLLM forks the
    core from the gateway already (which never initialises CUDA itself, see ``detect``)."""
    return not platform.on_cuda


def engine_defaults(platform: Platform) -> dict[str, object]:
    """vLLM engine arguments that differ by platform (a models file's `engine_args` win).

    CPU: eager mode (torch.compile costs ~90 s of start-up for no gain at 135M here).
    CUDA: vLLM's own defaults: CUDA graphs, prefix caching.
    """
    if platform.on_cuda:
        return {}
    return {"enforce_eager": True}


def engine_dtype(requested: str, platform: Platform) -> str:
    """The dtype an engine runs in: a models file's explicit dtype as written; ``auto`` is
    vLLM's own choice on CUDA (the checkpoint's, float32 checkpoints in half precision)
    and float32 on a CPU.

    Why not vLLM's bf16 on a CPU: its bf16 kernels depend on the instruction set — emulated
    on AVX2 (slower than float32 at batch 16: 42 vs 115 tok/s), native on AVX512_BF16 with
    a rounding of their own. The embedded model's greedy first token has a 0.10-nat margin
    (float32: "The" -1.864, "L" -1.963 for "What is the capital of France?"); vLLM's eager
    bf16 with its CPU rotary kernel flips it on an AVX512_BF16 Xeon, and the answer becomes
    "L'Étoile, la Marseillaise, …" where transformers' bf16, vLLM's compiled bf16 and every
    float32 path say Paris. float32 computes what the weights say, on any CPU.
    """
    if requested != "auto" or platform.on_cuda:
        return requested
    return "float32"


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
