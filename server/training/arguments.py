"""The training arguments every method shares (CUT, KTO, DPO, Quark): LoRA, optimizer and
schedule, batch, length, device and precision. Each method's config is a subclass that adds
its own fields (``CutConfig``'s threshold, ``KtoConfig``'s beta, ...), as TRL's ``KTOConfig``
extends transformers' ``TrainingArguments``; one JSON file or one set of CLI flags holds both.

The defaults here are the only ones: ``aligngate train``, ``aligngate align`` and the
server's online loop all start from them (a request or a flag overrides a field; it never
restates a default).

Owns: the fields, their defaults and help, reading and writing them as JSON, deciding the
device and precision, the warm-up rule. Does not know: models, data, the training loop.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

from server.resources.platform import Platform, detect, training_device


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True)
class TrainingArgs:
    """Shared by every method. Defaults fit the online loop's small windows (tens of
    examples) as well as the CUT paper's 1,000-record iterations; the docs' Training methods
    page (docs/alignment/training-methods.md) gives the measured reasons."""

    lora_r: int = _help("LoRA rank", default=16)
    lora_alpha: int = _help("LoRA alpha (with --lora-r alone: the rank)", default=16)
    lora_dropout: float = _help("LoRA dropout", default=0.05)
    target_modules: tuple[str, ...] = _help(
        "LoRA modules, comma-separated (GPT-J: its MLP's fc_in,fc_out stand in for these)",
        default=("gate_proj", "down_proj", "up_proj"),
    )
    learning_rate: float = _help("peak learning rate (cosine schedule)", default=4e-4)
    # Warm-up: this fraction of the run's optimizer steps, at most ``warmup_steps`` (CUT's
    # 100 for long runs). A fixed 100 steps would keep a small online window (8-60 judged
    # responses: 1-8 steps) in warm-up for its whole run, and the adapter would not move.
    warmup_steps: int = _help("linear warm-up steps, at most", default=100)
    warmup_ratio: float = _help("warm-up as a fraction of the run's steps", default=0.1)
    batch_size: int = _help("examples per optimizer step", default=8)
    # Examples per forward pass; the rest of a batch is gradient accumulation.
    micro_batch_size: int = _help(
        "examples per forward pass (accumulated to --batch-size)", default=1
    )
    epochs: int = _help("passes over the data", default=1)
    max_steps: int | None = _help("stop after this many optimizer steps", default=None)
    cutoff: int = _help("tokens per sequence; longer ones are cut", default=2048)
    seed: int = _help("random seed", default=0)
    # auto: bfloat16 on a GPU, float32 on a CPU (bfloat16 works on CPUs with AVX-512 bf16)
    dtype: str = _help(
        "training precision (auto: bfloat16 on GPUs, float32 on CPUs)", default="auto"
    )
    threads: int | None = _help("torch CPU threads", default=None)
    device: str = _help("auto (CUDA when present), cpu, cuda or cuda:N", default="auto")
    # Recompute each layer's activations in the backward pass: ~1/5 of the activation
    # memory for ~30 % more compute (what lets a 13B run fit beside its engine).
    gradient_checkpointing: bool = _help("recompute activations", default=False)

    @classmethod
    def from_json(cls, path: Path) -> Self:
        """Settings written by ``to_json`` (or by hand): any subset of the fields."""
        values = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(values, dict) or set(values) - known:
            unknown = sorted(set(values) - known) if isinstance(values, dict) else values
            raise ValueError(f"{path}: not a JSON object of {cls.__name__} fields ({unknown!r})")
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Self:
        values = dict(values)
        if "target_modules" in values:
            values["target_modules"] = tuple(values["target_modules"])
        if "lora_r" in values and "lora_alpha" not in values:
            values["lora_alpha"] = values["lora_r"]  # alpha follows the rank unless set
        return cls(**values)

    def to_json(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2))

    def as_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @property
    def forward_batch(self) -> int:
        """Examples per forward pass: the micro-batch, never more than the batch."""
        return min(self.micro_batch_size, self.batch_size)

    def accumulation(self) -> int:
        return max(1, math.ceil(self.batch_size / self.forward_batch))

    def optimizer_steps(self, examples: int) -> int:
        """Optimizer steps a run over ``examples`` takes (``max_steps`` caps it)."""
        per_epoch = math.ceil(math.ceil(examples / self.forward_batch) / self.accumulation())
        total = per_epoch * self.epochs
        return min(total, self.max_steps) if self.max_steps else total


def field_help(config: type[TrainingArgs]) -> list[tuple[str, Any, str]]:
    """(name, type annotation, help) of each field, for the CLI's flags."""
    return [(f.name, f.type, f.metadata.get("help", "")) for f in dataclasses.fields(config)]


C = TypeVar("C", bound=TrainingArgs)


def torch_dtype(name: str) -> Any:
    import torch

    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            name
        ]
    except KeyError:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, not {name!r}") from None


def placed(config: C, platform: Platform | None = None) -> C:
    """``config`` with its device and precision decided: ``auto`` → the first CUDA device
    (bfloat16) when there is one, else the CPU (float32). A CUDA device that is not there
    is a ``PlatformError``."""
    device = training_device(config.device, platform or detect())
    dtype = device.default_dtype if config.dtype == "auto" else config.dtype
    torch_dtype(dtype)  # refuses an unknown precision before anything loads
    return dataclasses.replace(config, device=device.torch_device, dtype=dtype)


def warmup_for(config: TrainingArgs, total_steps: int) -> int:
    """``warmup_ratio`` of the run, rounded down (a linear warm-up's first step has learning
    rate 0, so a short run gets none), at most ``warmup_steps``."""
    return min(config.warmup_steps, math.floor(config.warmup_ratio * total_steps))
