"""The resource plan: which devices each engine runs on, how much memory it may take, what
is kept for training, and in which order engines start. Checked before anything starts.

On CUDA, engines that share a GPU and name no share divide the usable memory (default 0.90
of the card, minus the training reserve on the GPU the online loop trains on) in proportion
to their demand (weights + LoRA slots + the KV cache they ask for + overhead), never below
their floor (weights + LoRA slots + one full-length sequence's KV cache + overhead). vLLM
takes the share as ``gpu_memory_utilization`` (a fraction of the whole card, per instance).
On a CPU each engine's KV cache is ``VLLM_CPU_KVCACHE_SPACE``, set against the machine's RAM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server.resources.platform import GIB, Platform, PlatformError, training_device

# Per engine and device beyond weights and KV cache: the CUDA context, activations at
# vLLM's profiling run, CUDA graphs (an estimate; vLLM measures the real figure at start).
GPU_ENGINE_OVERHEAD_GIB = 2.0
# Per engine on a CPU: the Python / torch / vLLM process itself (measured here: four
# 135M engines with 2 GiB KV caches each took 13.4 GiB RSS).
CPU_ENGINE_OVERHEAD_GIB = 1.1
# An engine's requested KV cache when its entry does not say: room for this many
# full-length sequences (shorter ones share it).
DEFAULT_KV_SEQUENCES = 8


@dataclass(frozen=True, slots=True)
class EngineDemand:
    """One models-file entry, in bytes and tokens."""

    name: str
    weights_bytes: int
    kv_bytes_per_token: int
    max_model_len: int
    kv_cache_tokens: int | None = None  # requested; default DEFAULT_KV_SEQUENCES × len
    lora_slots: int = 0  # adapters in one batch (vLLM's max_loras); 0 = LoRA off
    lora_slot_bytes: int = 0
    devices: tuple[int, ...] | None = None  # CUDA indices; several = tensor parallel
    memory_fraction: float | None = None  # gpu_memory_utilization, of the whole card
    memory_gib: float | None = None

    @property
    def tensor_parallel(self) -> int:
        return len(self.devices) if self.devices else 1

    @property
    def requested_kv_tokens(self) -> int:
        return self.kv_cache_tokens or DEFAULT_KV_SEQUENCES * self.max_model_len

    def per_device_gib(self, kv_tokens: int) -> float:
        """Weights, LoRA slots and ``kv_tokens`` of cache, split over its devices, plus
        the overhead every device pays."""
        shared = self.weights_bytes + self.lora_slots * self.lora_slot_bytes
        shared += kv_tokens * self.kv_bytes_per_token
        return shared / self.tensor_parallel / GIB + GPU_ENGINE_OVERHEAD_GIB

    @property
    def floor_gib(self) -> float:
        return self.per_device_gib(self.max_model_len)

    @property
    def demand_gib(self) -> float:
        return self.per_device_gib(max(self.requested_kv_tokens, self.max_model_len))


@dataclass(frozen=True, slots=True)
class TrainingDemand:
    """What the online loop's trainer needs, for the largest model it may train."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    reserve_gib: float | None = None  # None: the estimate
    needed_bytes: int = 0  # the estimate (weights + LoRA state + activations + ...)
    model: str | None = None  # whose estimate it is
    breakdown: str = ""
    gradient_checkpointing: bool = False


@dataclass(slots=True)
class EnginePlan:
    name: str
    devices: tuple[int, ...]  # empty on a CPU
    share_gib: float  # per device on CUDA; the whole engine on a CPU
    weights_gib: float
    kv_cache_gib: float  # in all (over its devices)
    kv_tokens: int
    lora_slots: int
    lora_gib: float
    gpu_memory_utilization: float | None = None
    explicit: bool = False  # the share was given in the models file
    # What CUDA_VISIBLE_DEVICES names for ``devices`` (the platform's ``Gpu.visible_id``).
    visible_ids: tuple[str, ...] = ()

    def engine_args(self) -> dict[str, object]:
        if self.gpu_memory_utilization is None:
            return {}
        args: dict[str, object] = {"gpu_memory_utilization": self.gpu_memory_utilization}
        if len(self.devices) > 1:
            args["tensor_parallel_size"] = len(self.devices)
        return args

    def environment(self) -> dict[str, str]:
        """Which GPUs the engine's processes see (vLLM numbers them from 0)."""
        if not self.devices:
            return {}
        ids = self.visible_ids or tuple(str(d) for d in self.devices)
        return {"CUDA_VISIBLE_DEVICES": ",".join(ids)}


@dataclass(slots=True)
class TrainingPlan:
    device: str  # torch device: cpu | cuda:N
    reserve_gib: float  # kept free on that GPU (0 on a CPU)
    needed_gib: float
    model: str | None
    breakdown: str
    gradient_checkpointing: bool = False

    @property
    def fits(self) -> bool:
        return self.device == "cpu" or self.needed_gib <= self.reserve_gib + 1e-9


@dataclass(slots=True)
class Plan:
    platform: Platform
    usable_fraction: float
    engines: list[EnginePlan] = field(default_factory=list)
    training: TrainingPlan | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Engines started together; groups one after another. On CUDA every engine starts
    # alone: vLLM's memory profiling assumes nothing else allocates meanwhile, and the
    # devices an engine sees (CUDA_VISIBLE_DEVICES) are process-wide while it spawns.
    start_groups: list[list[str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def engine(self, name: str) -> EnginePlan:
        return next(e for e in self.engines if e.name == name)


class PlanError(ValueError):
    """An over-committed or impossible plan; the message names models, devices, figures."""


def _gib(value: float) -> str:
    return f"{value:.1f} GiB"


def make_plan(
    demands: list[EngineDemand],
    platform: Platform,
    *,
    training: TrainingDemand | None = None,
    usable_fraction: float = 0.90,
    cpu_kv_cache_gib: float = 2.0,
) -> Plan:
    plan = Plan(platform=platform, usable_fraction=usable_fraction)
    if platform.on_cuda:
        _plan_cuda(plan, demands, training)
    else:
        _plan_cpu(plan, demands, training, cpu_kv_cache_gib)
    return plan


def _training_plan(
    plan: Plan, training: TrainingDemand | None, *, gpu_index: int | None
) -> TrainingPlan | None:
    if training is None:
        return None
    needed = training.needed_bytes / GIB
    if gpu_index is None:
        device, reserve = "cpu", 0.0
    else:
        device = f"cuda:{gpu_index}"
        reserve = training.reserve_gib if training.reserve_gib is not None else needed
    return TrainingPlan(
        device=device,
        reserve_gib=reserve,
        needed_gib=needed,
        model=training.model,
        breakdown=training.breakdown,
        gradient_checkpointing=training.gradient_checkpointing,
    )


def _training_gpu(plan: Plan, training: TrainingDemand | None) -> int | None:
    """The GPU the online loop trains on: the one asked for; with ``auto``, the last GPU
    when there are several (engines placed automatically avoid it), else GPU 0."""
    if training is None:
        return None
    try:
        device = training_device(training.device, plan.platform)
    except PlatformError as exc:
        plan.problems.append(f"training: {exc}")
        return None
    if device.cuda_index is None:
        return None
    if training.device == "auto" and len(plan.platform.gpus) > 1:
        return plan.platform.gpus[-1].index
    return device.cuda_index


def _place(
    plan: Plan, demands: list[EngineDemand], avoid: int | None
) -> dict[str, tuple[int, ...]]:
    """Engines that name devices keep them; the others go, largest first, to the GPU with
    the most room left (not the training GPU while another has room)."""
    placed: dict[str, tuple[int, ...]] = {}
    room = {g.index: g.total_gib * plan.usable_fraction for g in plan.platform.gpus}
    for d in demands:
        if d.devices:
            for index in d.devices:
                if index not in room:
                    plan.problems.append(
                        f"model {d.name!r}: CUDA device {index} does not exist "
                        f"(devices: {', '.join(map(str, room)) or 'none'})"
                    )
                    continue
                room[index] -= d.floor_gib
            placed[d.name] = d.devices
    for d in sorted((d for d in demands if not d.devices), key=lambda d: -d.demand_gib):
        choices = [i for i in room if i != avoid] or list(room)
        best = max(choices, key=lambda i: room[i])
        room[best] -= d.demand_gib
        placed[d.name] = (best,)
    return placed


def _plan_cuda(plan: Plan, demands: list[EngineDemand], training: TrainingDemand | None) -> None:
    if not plan.platform.gpus:
        plan.problems.append("no CUDA device")
        return
    train_gpu = _training_gpu(plan, training)
    plan.training = _training_plan(plan, training, gpu_index=train_gpu)
    placed = _place(plan, demands, avoid=train_gpu)
    if plan.problems:
        return
    shares: dict[str, dict[int, float]] = {d.name: {} for d in demands}
    explicit: set[str] = set()
    for gpu in plan.platform.gpus:
        usable = gpu.total_gib * plan.usable_fraction
        reserve = plan.training.reserve_gib if plan.training and train_gpu == gpu.index else 0.0
        here = [d for d in demands if gpu.index in placed[d.name]]
        fixed = {}
        for d in here:
            if d.memory_fraction is not None:
                fixed[d.name] = d.memory_fraction * gpu.total_gib
            elif d.memory_gib is not None:
                fixed[d.name] = d.memory_gib
        explicit |= set(fixed)
        available = usable - reserve - sum(fixed.values())
        free = [d for d in here if d.name not in fixed]
        floors = {d.name: d.floor_gib for d in here}
        need = sum(floors[d.name] for d in free)
        if available < need - 1e-9:
            lines = [
                f"{d.name} {_gib(fixed[d.name])} (given)"
                if d.name in fixed
                else f"{d.name} ≥ {_gib(floors[d.name])}"
                for d in here
            ]
            reserved = f" − training reserve {_gib(reserve)}" if reserve else ""
            plan.problems.append(
                f"GPU {gpu.index} ({_gib(gpu.total_gib)}) is over-committed: "
                f"{', '.join(lines)}; usable {_gib(usable)} ({plan.usable_fraction:.2f} of the "
                f"card){reserved} = {_gib(usable - reserve)}"
            )
            continue
        for name, value in _water_fill(free, available).items():
            shares[name][gpu.index] = value
        for name, value in fixed.items():
            shares[name][gpu.index] = value
    if plan.problems:
        return
    for d in demands:
        devices = placed[d.name]
        share = min(shares[d.name][i] for i in devices)
        total = min(plan.platform.gpu(i).total_gib for i in devices)
        if share < d.floor_gib - 1e-9:
            plan.problems.append(
                f"model {d.name!r}: its share {_gib(share)} on GPU "
                f"{','.join(map(str, devices))} is below its floor {_gib(d.floor_gib)} "
                f"(weights {_gib(d.weights_bytes / d.tensor_parallel / GIB)} + one "
                f"{d.max_model_len}-token sequence + LoRA slots + overhead)"
            )
        kv_per_device = share - d.per_device_gib(0)
        kv_tokens = int(max(kv_per_device, 0) * GIB * d.tensor_parallel // d.kv_bytes_per_token)
        plan.engines.append(
            EnginePlan(
                name=d.name,
                devices=devices,
                share_gib=share,
                weights_gib=d.weights_bytes / GIB,
                kv_cache_gib=max(kv_per_device, 0) * d.tensor_parallel,
                kv_tokens=kv_tokens,
                lora_slots=d.lora_slots,
                lora_gib=d.lora_slots * d.lora_slot_bytes / GIB,
                # Rounded down, so that shares never add up past the card.
                gpu_memory_utilization=int(share / total * 10_000) / 10_000,
                explicit=d.name in explicit,
                visible_ids=tuple(plan.platform.gpu(i).visible_id for i in devices),
            )
        )
    plan.start_groups = [[d.name] for d in demands]
    if plan.training and not plan.training.fits:
        plan.problems.append(
            f"training on {plan.training.device}: the reserve {_gib(plan.training.reserve_gib)} "
            f"cannot hold {plan.training.model}'s CUT run, ~{_gib(plan.training.needed_gib)} "
            f"({plan.training.breakdown})"
        )


def _water_fill(demands: list[EngineDemand], available: float) -> dict[str, float]:
    """Split ``available`` in proportion to demand; an engine whose proportional share falls
    below its floor gets its floor and the rest is split again among the others."""
    pinned: dict[str, float] = {}
    while True:
        rest = [d for d in demands if d.name not in pinned]
        left = available - sum(pinned.values())
        total = sum(d.demand_gib for d in rest)
        shares = {d.name: left * d.demand_gib / total for d in rest} if total else {}
        low = [d for d in rest if shares[d.name] < d.floor_gib]
        if not low:
            return {**pinned, **shares}
        for d in low:
            pinned[d.name] = d.floor_gib


def _plan_cpu(
    plan: Plan,
    demands: list[EngineDemand],
    training: TrainingDemand | None,
    kv_gib: float,
) -> None:
    for d in demands:
        if d.devices or d.memory_fraction is not None or d.memory_gib is not None:
            plan.notes.append(f"{d.name}: GPU settings (devices, memory share) ignored on a CPU")
        if kv_gib * GIB < d.max_model_len * d.kv_bytes_per_token:
            plan.problems.append(
                f"model {d.name!r}: a KV cache of {kv_gib:g} GiB cannot hold one "
                f"{d.max_model_len}-token sequence "
                f"({_gib(d.max_model_len * d.kv_bytes_per_token / GIB)}); raise "
                "ALIGNGATE_CPU_KV_CACHE_GIB or lower max_model_len"
            )
        lora_gib = d.lora_slots * d.lora_slot_bytes / GIB
        plan.engines.append(
            EnginePlan(
                name=d.name,
                devices=(),
                share_gib=d.weights_bytes / GIB + kv_gib + lora_gib + CPU_ENGINE_OVERHEAD_GIB,
                weights_gib=d.weights_bytes / GIB,
                kv_cache_gib=kv_gib,
                kv_tokens=int(kv_gib * GIB // d.kv_bytes_per_token),
                lora_slots=d.lora_slots,
                lora_gib=lora_gib,
            )
        )
    plan.start_groups = [[d.name for d in demands]] if demands else []
    used = sum(e.share_gib for e in plan.engines)
    usable = plan.platform.ram_gib * plan.usable_fraction
    if used > usable:
        plan.problems.append(
            f"RAM is over-committed: the engines need ~{_gib(used)} "
            f"({', '.join(f'{e.name} {_gib(e.share_gib)}' for e in plan.engines)}); usable "
            f"{_gib(usable)} of {_gib(plan.platform.ram_gib)}"
        )
    plan.training = _training_plan(plan, training, gpu_index=None)
    if plan.training and used + plan.training.needed_gib > plan.platform.ram_gib:
        plan.notes.append(
            f"training on the CPU needs ~{_gib(plan.training.needed_gib)} beside the engines' "
            f"{_gib(used)}: more than the machine's {_gib(plan.platform.ram_gib)} RAM"
        )
