"""The CUT trainer: LoRA on a causal LM, one judged response at a time (micro-batch 1),
gradient accumulation to the batch size, AdamW with a cosine schedule and warm-up.

Owns: loading the base (and an adapter to continue from), the training loop, writing the
adapter folder with its metadata. Does not know: HTTP, the store, vLLM.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from server.models.adapter_meta import META_FILE, base_fingerprint, write_json_atomic
from server.models.render import Renderer
from server.resources.platform import GIB, Platform, detect, training_device
from server.resources.sizing import DTYPE_BYTES, TrainingMemory, read_shape, training_memory
from server.training.cut_data import CutDataset, CutExample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CutConfig:
    """CUT's hyper-parameters; defaults are the paper's online iterations (DESIGN.md §7)."""

    threshold: float = 1.1  # p_A / p_B above this flags a token as an error
    weight_unlike: float = 1.0  # weight of the unlikelihood term (offline/Shepherd: 0.5)
    downsample: float = 0.25  # fine responses kept per judged one (negative: keep all)
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("gate_proj", "down_proj", "up_proj")
    learning_rate: float = 4e-4
    # Warm-up: this fraction of the run's optimizer steps, at most ``warmup_steps`` (CUT's
    # 100 for long runs). A fixed 100 steps would keep a small online window (8-60 judged
    # responses: 1-8 steps) in warm-up for its whole run, and the adapter would not move.
    warmup_steps: int = 100
    warmup_ratio: float = 0.1
    batch_size: int = 8  # examples per optimizer step (micro-batch 1, accumulated)
    epochs: int = 1
    cutoff: int = 2048  # tokens per sequence; longer ones lose prompt tokens from the left
    seed: int = 0
    # auto: bfloat16 on a GPU, float32 on a CPU (bfloat16 works on CPUs with AVX-512 bf16)
    dtype: str = "auto"
    threads: int | None = None  # torch CPU threads (None: torch's default)
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N
    # Recompute each layer's activations in the backward pass: ~1/5 of the activation
    # memory for ~30 % more compute (what lets a 13B CUT run fit beside its engine).
    gradient_checkpointing: bool = False

    @classmethod
    def from_json(cls, path: Path) -> CutConfig:
        """Settings written by ``to_json`` (or by hand): any subset of the fields."""
        values = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(values, dict) or set(values) - known:
            unknown = sorted(set(values) - known) if isinstance(values, dict) else values
            raise ValueError(f"{path}: not a JSON object of CUT settings ({unknown!r})")
        if "target_modules" in values:
            values["target_modules"] = tuple(values["target_modules"])
        return cls(**values)

    def to_json(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2))


@dataclass
class TrainReport:
    steps: int = 0
    examples: int = 0
    tokens: int = 0  # tokens through forward + backward (both sequences of judged examples)
    response_tokens: int = 0
    flagged_tokens: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)  # per optimizer step
    warmup_steps: int = 0
    # The adapter's measured effect on its own judged data (``measure_effect``).
    effect: dict[str, Any] | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "examples": self.examples,
            "tokens": self.tokens,
            "response_tokens": self.response_tokens,
            "flagged_tokens": self.flagged_tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "first_loss": self.losses[0] if self.losses else None,
            "final_loss": self.losses[-1] if self.losses else None,
            "warmup_steps": self.warmup_steps,
            "effect": self.effect,
        }


# (step, total_steps, loss) after each optimizer step
Progress = Callable[[int, int, float], None]


def _dtype(name: str) -> Any:
    import torch

    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            name
        ]
    except KeyError:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, not {name!r}") from None


class TrainingMemoryError(RuntimeError):
    """The training device cannot hold the run; the message has the numbers."""


def placed(config: CutConfig, platform: Platform | None = None) -> CutConfig:
    """``config`` with its device and precision decided: ``auto`` → the first CUDA device
    (bfloat16) when there is one, else the CPU (float32). A CUDA device that is not there
    is a ``PlatformError``."""
    device = training_device(config.device, platform or detect())
    dtype = device.default_dtype if config.dtype == "auto" else config.dtype
    _dtype(dtype)  # refuses an unknown precision before anything loads
    return dataclasses.replace(config, device=device.torch_device, dtype=dtype)


def memory_needed(base: Path, config: CutConfig) -> TrainingMemory:
    """The planner's estimate for this run (weights, LoRA state, activations, logits)."""
    return training_memory(
        read_shape(base),
        dtype_bytes=DTYPE_BYTES[config.dtype],
        lora_rank=config.lora_r,
        target_modules=config.target_modules,
        cutoff=config.cutoff,
        gradient_checkpointing=config.gradient_checkpointing,
    )


def check_fits(needed: TrainingMemory, free_bytes: int, device: str) -> None:
    if needed.total > free_bytes:
        raise TrainingMemoryError(
            f"{device} has {free_bytes / GIB:.1f} GiB free; this CUT run needs "
            f"~{needed.total / GIB:.1f} GiB ({needed.describe()}). Lower --cutoff, turn on "
            "--gradient-checkpointing, or train on another device."
        )


def _check_device_memory(base: Path, config: CutConfig) -> None:
    """On a GPU, refuse before loading anything when the free memory cannot hold the run
    (vLLM holds its share of the card; the plan's training reserve is what is left)."""
    if not config.device.startswith("cuda"):
        return
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(config.device))
    check_fits(memory_needed(base, config), int(free), config.device)


def load_trainable(
    base: Path,
    config: CutConfig,
    init_adapter: Path | None = None,
    *,
    trust_remote_code: bool = False,
) -> Any:
    """The base model with a fresh LoRA (or ``init_adapter``, to continue training it), on
    ``config.device`` (``placed`` decides it) in ``config.dtype``."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    config = placed(config) if "auto" in (config.device, config.dtype) else config
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_pretrained(
        str(base), dtype=_dtype(config.dtype), trust_remote_code=trust_remote_code
    ).to(config.device)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # the frozen embeddings' output needs a grad
    if init_adapter is not None:
        return PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def response_logprobs(model: Any, sequences: list[list[int]], response_len: int) -> list[Any]:
    """log p of each sequence's last ``response_len`` tokens, one forward for all sequences.

    Left-padded with explicit positions, so every sequence ends in the last column and only
    the response positions go through the LM head (a 49k-vocabulary head over the prompt
    costs more than the rest of the step on a small model)."""
    import torch

    from server.training.cut_loss import token_logprobs

    width = max(len(s) for s in sequences)
    ids = torch.zeros((len(sequences), width), dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq)
        mask[row, width - len(seq) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    device = next(model.parameters()).device
    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    # the logits at position t predict token t + 1
    logits = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        logits_to_keep=response_len + 1,
    ).logits[:, :-1]
    targets = ids[:, width - response_len :]
    return [token_logprobs(logits[row], targets[row]) for row in range(len(sequences))]


def warmup_for(config: CutConfig, total_steps: int) -> int:
    """``warmup_ratio`` of the run, rounded down (a linear warm-up's first step has learning
    rate 0, so a short run gets none), at most ``warmup_steps``."""
    return min(config.warmup_steps, math.floor(config.warmup_ratio * total_steps))


# Judged examples the effect is measured on (two no-grad forwards each, before and after).
EFFECT_EXAMPLES = 32


def flagged_logprobs(model: Any, examples: list[CutExample], config: CutConfig) -> list[Any]:
    """Per judged example: (log p of its response tokens under the plain prompt, which of
    them CUT flags) — the model as it is now, no gradient."""
    import torch

    from server.training.cut_loss import cut_loss

    measured = []
    with torch.no_grad():
        for example in examples:
            judge, plain = response_logprobs(
                model, [example.judge_ids, example.plain_ids], example.response_len
            )
            out = cut_loss(
                judge, plain, threshold=config.threshold, weight_unlike=config.weight_unlike
            )
            measured.append((plain.float().cpu(), out.flagged.cpu()))
    return measured


def measure_effect(before: list[Any], after: list[Any]) -> dict[str, Any]:
    """Mean log p of the tokens flagged before training, and of the others, before → after:
    what the adapter did to the very tokens its judgments named."""
    import torch

    def mean(rows: list[Any], flagged: bool) -> float | None:
        picked = [lp[mask == flagged] for (lp, _), (_, mask) in zip(rows, before, strict=True)]
        values = torch.cat(picked) if picked else torch.empty(0)
        return round(float(values.mean()), 4) if values.numel() else None

    effect: dict[str, Any] = {"examples": len(before)}
    for name, flagged in (("flagged", True), ("unflagged", False)):
        b, a = mean(before, flagged), mean(after, flagged)
        effect[name] = {
            "tokens": int(sum(int((m == flagged).sum()) for _, m in before)),
            "logp_before": b,
            "logp_after": a,
            "delta": round(a - b, 4) if a is not None and b is not None else None,
        }
    return effect


def example_loss(model: Any, example: CutExample, config: CutConfig) -> Any:
    from server.training.cut_loss import cut_loss, likelihood_loss

    n = example.response_len
    if example.judge_ids is None:
        (plain,) = response_logprobs(model, [example.plain_ids], n)
        return likelihood_loss(plain)
    judge, plain = response_logprobs(model, [example.judge_ids, example.plain_ids], n)
    return cut_loss(judge, plain, threshold=config.threshold, weight_unlike=config.weight_unlike)


def train(
    model: Any, examples: list[CutExample], config: CutConfig, progress: Progress | None = None
) -> TrainReport:
    import torch
    from transformers import get_cosine_schedule_with_warmup

    if not examples:
        raise ValueError("no training examples")
    if config.threads:
        torch.set_num_threads(config.threads)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    total_steps = math.ceil(len(examples) / config.batch_size) * config.epochs
    warmup = warmup_for(config, total_steps)
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    report = TrainReport(warmup_steps=warmup)
    started = time.perf_counter()
    for _ in range(config.epochs):
        for start in range(0, len(examples), config.batch_size):
            batch = examples[start : start + config.batch_size]
            step_loss = 0.0
            for example in batch:
                out = example_loss(model, example, config)
                (out.loss / len(batch)).backward()
                step_loss += out.loss.item() / len(batch)
                report.examples += 1
                report.tokens += example.tokens
                report.response_tokens += example.response_len
                report.flagged_tokens += int(out.flagged.sum())
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            report.steps += 1
            report.losses.append(round(step_loss, 6))
            if progress is not None:
                progress(report.steps, total_steps, step_loss)
    report.seconds = time.perf_counter() - started
    model.eval()
    return report


def save_adapter(
    model: Any,
    out: Path,
    *,
    base: Path,
    base_name: str | None,
    renderer: Renderer,
    config: CutConfig,
    dataset: CutDataset,
    data_path: Path,
    report: TrainReport,
    init_adapter: Path | None = None,
) -> Path:
    """Write the PEFT folder (safetensors) and its metadata, then move it into place."""
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    meta = {
        "format": 1,
        "name": out.name,
        "method": "cut",
        "base_model": {
            "name": base_name,
            "path": str(base.resolve()),
            "fingerprint": base_fingerprint(base),
        },
        "family": renderer.family,
        "template": renderer.template_name,
        "template_fingerprint": renderer.fingerprint,
        "init_adapter": str(init_adapter) if init_adapter else None,
        "data": {
            "path": str(data_path),
            "sha256": dataset.sha256,
            "examples": len(dataset.examples),
            "judged": dataset.judged,
            "fine": dataset.fine,
            "fine_dropped": dataset.fine_dropped,
            "skipped": dataset.skipped,
        },
        "hyperparameters": json.loads(json.dumps(dataclasses.asdict(config))),
        "train": report.as_dict(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_json_atomic(tmp / META_FILE, meta)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def train_cut_adapter(
    *,
    base: Path,
    data: Path,
    out: Path,
    config: CutConfig,
    family: str | None = None,
    template: str | None = None,
    base_name: str | None = None,
    init_adapter: Path | None = None,
    progress: Progress | None = None,
    trust_remote_code: bool = False,
) -> tuple[Path, TrainReport, CutDataset]:
    """Data file → examples (with the served renderer) → LoRA training → adapter folder."""
    from server.training.cut_data import CutDataError, build_dataset, read_records

    config = placed(config)
    _check_device_memory(base, config)
    renderer = Renderer.load(
        base, family_name=family, template=template, trust_remote_code=trust_remote_code
    )
    records, sha256 = read_records(data)
    dataset = build_dataset(
        renderer,
        records,
        sha256=sha256,
        downsample_ratio=config.downsample,
        cutoff=config.cutoff,
        seed=config.seed,
    )
    if not dataset.examples:
        raise CutDataError(
            f"{data}: no usable examples ({len(records)} records, {dataset.skipped} skipped)"
        )
    log.info(
        "CUT data: %d judged + %d fine examples (%d fine dropped by downsampling, %d skipped)",
        dataset.judged,
        dataset.fine,
        dataset.fine_dropped,
        dataset.skipped,
    )
    model = load_trainable(base, config, init_adapter, trust_remote_code=trust_remote_code)
    judged = [e for e in dataset.examples if e.judge_ids is not None][:EFFECT_EXAMPLES]
    before = flagged_logprobs(model, judged, config)
    report = train(model, dataset.examples, config, progress)
    report.effect = measure_effect(before, flagged_logprobs(model, judged, config))
    log.info("Effect on its own judged data: %s", report.effect)
    save_adapter(
        model,
        out,
        base=base,
        base_name=base_name,
        renderer=renderer,
        config=config,
        dataset=dataset,
        data_path=data,
        report=report,
        init_adapter=init_adapter,
    )
    return out, report, dataset
