"""From the models file to the resource plan: each entry's demand (weights from its
checkpoint's safetensors headers, KV-cache bytes per token from its config, LoRA slots)
and the online loop's training demand, planned on a platform.

Owns: the translation of models-file entries into ``server.resources`` demands.
Does not know: vLLM, HTTP, how the plan is carried out (the registry does that).
"""

from __future__ import annotations

from pathlib import Path

from server.models.models_file import ModelEntry, Resources, resolve_path
from server.resources.plan import EngineDemand, Plan, TrainingDemand, make_plan
from server.resources.platform import Platform, effective_cpu_kv_cache_gib
from server.resources.sizing import (
    SizingError,
    dtype_bytes,
    read_shape,
    training_memory,
    weights_bytes,
)
from server.settings import Settings


class PlanningError(ValueError):
    """An entry whose size cannot be read."""


def engine_demand(entry: ModelEntry, folder: Path) -> EngineDemand:
    try:
        shape = read_shape(folder)
        served = dtype_bytes(entry.dtype, shape)
    except SizingError as exc:
        raise PlanningError(f"model {entry.name!r}: {exc}") from exc
    lora = entry.lora_settings
    if lora and shape.is_gptj:
        # vLLM's GPTJForCausalLM does not implement LoRA (SupportsLoRA).
        raise PlanningError(f"model {entry.name!r}: vLLM serves no LoRA on GPT-J; drop `lora:`")
    return EngineDemand(
        name=entry.name,
        weights_bytes=weights_bytes(folder, shape, served),
        kv_bytes_per_token=shape.kv_bytes_per_token(served),
        max_model_len=entry.max_model_len or shape.max_position,
        kv_cache_tokens=entry.kv_cache_tokens,
        lora_slots=lora.max_loras if lora else 0,
        lora_slot_bytes=shape.lora_slot_bytes(lora.max_rank, served) if lora else 0,
        devices=tuple(entry.devices) if entry.devices else None,
        memory_fraction=entry.gpu_memory_utilization,
        memory_gib=entry.gpu_memory_gib,
    )


def training_demand(
    entries: list[tuple[ModelEntry, Path]], resources: Resources, platform: Platform
) -> TrainingDemand | None:
    """The online loop trains LoRA on models served with LoRA; the reserve must hold the
    largest of them at CUT's defaults (rank 16 on gate/up/down, cutoff 2,048), in bfloat16
    on a GPU and float32 on a CPU."""
    trainable = [(e, f) for e, f in entries if e.lora_settings is not None]
    if not trainable:
        return None
    per_weight = 2 if platform.on_cuda else 4
    estimates = []
    for entry, folder in trainable:
        try:
            shape = read_shape(folder)
        except SizingError as exc:
            raise PlanningError(f"model {entry.name!r}: {exc}") from exc
        memory = training_memory(
            shape,
            dtype_bytes=per_weight,
            gradient_checkpointing=resources.training.gradient_checkpointing,
        )
        estimates.append((memory.total, entry.name, memory.describe()))
    needed, model, breakdown = max(estimates)
    return TrainingDemand(
        device=resources.training.device,
        reserve_gib=resources.training.reserve_gib,
        needed_bytes=needed,
        model=model,
        breakdown=breakdown,
        gradient_checkpointing=resources.training.gradient_checkpointing,
    )


def plan_entries(
    entries: list[tuple[ModelEntry, Path]],
    resources: Resources,
    settings: Settings,
    platform: Platform,
) -> Plan:
    """The plan for entries whose checkpoint folders are known."""
    return make_plan(
        [engine_demand(entry, folder) for entry, folder in entries],
        platform,
        training=training_demand(entries, resources, platform),
        usable_fraction=resources.gpu_memory_fraction,
        cpu_kv_cache_gib=effective_cpu_kv_cache_gib(settings.cpu_kv_cache_gib, platform),
    )


def plan_deployment(
    entries: list[ModelEntry], resources: Resources, settings: Settings, platform: Platform
) -> Plan:
    """Resolve each entry's checkpoint (converting the embedded model once if needed), then
    plan."""
    return plan_entries(
        [(entry, Path(resolve_path(entry, settings))) for entry in entries],
        resources,
        settings,
        platform,
    )
