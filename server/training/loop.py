"""The one training loop every method runs in: transformers' ``Trainer`` (TRL's ``KTOTrainer``
and ``DPOTrainer`` are ``Trainer`` subclasses; CUT and Quark subclass it with their own
``compute_loss``). What the methods share lives here: loading the base with a LoRA, turning
``TrainingArgs`` into the trainer's arguments, progress after each optimizer step, the
report (losses, the trainer's own metrics, the loss on a sample of the data before and after)
and the adapter folder with its metadata.

Owns: the loop's plumbing. Does not know: any method's loss or data format, HTTP, the store,
vLLM.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from server.models.adapter_meta import META_FILE, base_fingerprint, write_json_atomic
from server.models.render import Renderer
from server.resources.platform import GIB
from server.resources.sizing import DTYPE_BYTES, TrainingMemory, read_shape, training_memory
from server.training.arguments import TrainingArgs, placed, torch_dtype, warmup_for

log = logging.getLogger(__name__)

# (step, total_steps, loss) after each optimizer step
Progress = Callable[[int, int, float], None]

# Examples the loss is measured on before and after training (no gradient).
EVAL_EXAMPLES = 32

# An architecture whose MLP projections are not named gate/up/down_proj: LoRA goes on these.
MLP_MODULES = {"gptj": ("fc_in", "fc_out"), "gpt2": ("c_fc", "c_proj")}


class TrainingMemoryError(RuntimeError):
    """The training device cannot hold the run; the message has the numbers."""


@dataclass
class TrainReport:
    method: str = "cut"
    steps: int = 0
    examples: int = 0
    tokens: int = 0  # tokens through forward + backward (CUT: both sequences)
    response_tokens: int = 0
    flagged_tokens: int = 0  # CUT: response tokens its judgments flagged
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)  # per optimizer step
    warmup_steps: int = 0
    # The loss (and the trainer's own metrics: TRL's rewards/chosen, margins, KL, ...) on up
    # to EVAL_EXAMPLES training examples, before and after training.
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    # The trainer's own metrics of the last optimizer step.
    metrics: dict[str, float] = field(default_factory=dict)
    # CUT: the adapter's measured effect on its own judged data (``measure_effect``).
    effect: dict[str, Any] | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "steps": self.steps,
            "examples": self.examples,
            "tokens": self.tokens,
            "response_tokens": self.response_tokens,
            "flagged_tokens": self.flagged_tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "first_loss": self.losses[0] if self.losses else None,
            "final_loss": self.losses[-1] if self.losses else None,
            "loss_before": self.before.get("loss"),
            "loss_after": self.after.get("loss"),
            "before": self.before,
            "after": self.after,
            "metrics": self.metrics,
            "warmup_steps": self.warmup_steps,
            "effect": self.effect,
        }


def memory_needed(base: Path, config: TrainingArgs) -> TrainingMemory:
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
            f"{device} has {free_bytes / GIB:.1f} GiB free; this training run needs "
            f"~{needed.total / GIB:.1f} GiB ({needed.describe()}). Lower --cutoff, turn on "
            "--gradient-checkpointing, or train on another device."
        )


def check_device_memory(base: Path, config: TrainingArgs) -> None:
    """On a GPU, refuse before loading anything when the free memory cannot hold the run
    (vLLM holds its share of the card; the plan's training reserve is what is left)."""
    if not config.device.startswith("cuda"):
        return
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(config.device))
    check_fits(memory_needed(base, config), int(free), config.device)


def lora_targets(model: Any, requested: tuple[str, ...]) -> list[str]:
    """``requested``, or the architecture's own MLP names where it has none of them."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if names & set(requested):
        return list(requested)
    own = MLP_MODULES.get(getattr(model.config, "model_type", ""))
    if own is None:
        raise ValueError(
            f"none of the LoRA target modules {', '.join(requested)} is in this "
            f"{model.config.model_type} model; pass --target-modules"
        )
    log.info("LoRA on %s (the %s MLP)", ", ".join(own), model.config.model_type)
    return list(own)


def load_trainable(
    base: Path,
    config: TrainingArgs,
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
        str(base), dtype=torch_dtype(config.dtype), trust_remote_code=trust_remote_code
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
        target_modules=lora_targets(model, config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def trainer_arguments(
    cls: type[Any], config: TrainingArgs, work_dir: Path, examples: int, **extra: Any
) -> Any:
    """``config`` as the arguments of a ``Trainer`` (``cls``: transformers'
    ``TrainingArguments`` or a TRL config class), plus the method's own ``extra`` fields.
    The model is loaded in ``config.dtype`` already, so no mixed precision is asked for."""
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    if config.device.startswith("cuda:"):
        import torch

        torch.cuda.set_device(int(config.device[5:]))  # the Trainer uses the current device
    total = config.optimizer_steps(examples)
    return cls(
        output_dir=str(work_dir),
        per_device_train_batch_size=config.forward_batch,
        per_device_eval_batch_size=config.forward_batch,
        gradient_accumulation_steps=config.accumulation(),
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=warmup_for(config, total),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=config.seed,
        data_seed=config.seed,
        bf16=False,
        fp16=False,
        use_cpu=config.device == "cpu",
        gradient_checkpointing=False,  # load_trainable turned it on when asked
        disable_tqdm=True,
        dataloader_num_workers=0,
        **extra,
    )


def progress_callback(progress: Progress | None, report: TrainReport) -> Any:
    """A ``TrainerCallback`` that records each optimizer step's loss and metrics in
    ``report`` and calls ``progress``."""
    from transformers import TrainerCallback

    class StepLog(TrainerCallback):  # type: ignore[misc]
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
            if not logs or "loss" not in logs:
                return
            report.steps = state.global_step
            report.losses.append(round(float(logs["loss"]), 6))
            report.metrics = {
                k: round(float(v), 6)
                for k, v in logs.items()
                if isinstance(v, int | float) and k not in ("epoch", "grad_norm")
            }
            if progress is not None:
                progress(state.global_step, state.max_steps, float(logs["loss"]))

    return StepLog()


def _evaluate(trainer: Any) -> dict[str, float]:
    metrics = trainer.evaluate()
    return {
        k.removeprefix("eval_"): round(float(v), 6)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not k.endswith(("_runtime", "_per_second", "epoch"))
    }


def run(trainer: Any, report: TrainReport, *, evaluate: bool = True) -> TrainReport:
    """Train; with ``evaluate``, measure the trainer's eval set (a sample of the training
    data) before and after. The model is left in eval mode."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # stdout carries the run's JSON summary
    if evaluate:
        report.before = _evaluate(trainer)
    started = time.perf_counter()
    trainer.train()
    report.seconds = time.perf_counter() - started
    report.steps = trainer.state.global_step
    if evaluate:
        report.after = _evaluate(trainer)
    trainer.model.eval()
    return report


def save_adapter(
    model: Any,
    out: Path,
    *,
    method: str,
    base: Path,
    base_name: str | None,
    renderer: Renderer,
    config: TrainingArgs,
    data: dict[str, Any],
    report: TrainReport,
    init_adapter: Path | None = None,
) -> Path:
    """Write the PEFT folder (safetensors) and its metadata, then move it into place.
    ``data``: the training file's path, hash and what it held (method-specific counts)."""
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    # Only the trained adapter: TRL adds a frozen "ref" copy of it to serve as the reference.
    model.save_pretrained(str(tmp), safe_serialization=True, selected_adapters=["default"])
    meta = {
        "format": 1,
        "name": out.name,
        "method": method,
        "base_model": {
            "name": base_name,
            "path": str(base.resolve()),
            "fingerprint": base_fingerprint(base),
        },
        "family": renderer.family,
        "template": renderer.template_name,
        "template_fingerprint": renderer.fingerprint,
        "init_adapter": str(init_adapter) if init_adapter else None,
        "data": data,
        "hyperparameters": json.loads(json.dumps(dataclasses.asdict(config))),
        "train": report.as_dict(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_json_atomic(tmp / META_FILE, meta)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
