"""The CUT trainer: LoRA on a causal LM, CUT's own loss (``cut_loss``) in transformers'
``Trainer`` (the loop every method shares, ``training.loop``), one judged response per
forward pass (micro-batch 1), gradient accumulation to the batch size, AdamW with a cosine
schedule and warm-up.

Owns: CUT's config, its examples' loss, the effect measurement, ``train cut`` end to end.
Does not know: HTTP, the store, vLLM.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.models.render import Renderer
from server.training.arguments import TrainingArgs, _help, placed, warmup_for
from server.training.cut_data import CutDataset, CutExample
from server.training.loop import (
    EVAL_EXAMPLES,
    Progress,
    TrainingMemoryError,
    TrainReport,
    check_device_memory,
    check_fits,
    load_trainable,
    memory_needed,
    progress_callback,
    run,
    save_adapter,
    trainer_arguments,
)

__all__ = [
    "CutConfig",
    "TrainReport",
    "TrainingMemoryError",
    "check_fits",
    "load_trainable",
    "memory_needed",
    "placed",
    "train_cut_adapter",
    "warmup_for",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CutConfig(TrainingArgs):
    """CUT's hyper-parameters; defaults are the paper's online iterations (docs/alignment/
    training-methods.md; Xu et al. 2023, arXiv:2312.14591)."""

    threshold: float = _help("p_A / p_B above this flags a token as an error", default=1.1)
    weight_unlike: float = _help("weight of the unlikelihood term", default=1.0)
    downsample: float = _help("fine responses kept per judged one (<0: all)", default=0.25)


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


def cut_trainer(
    model: Any,
    examples: list[CutExample],
    config: CutConfig,
    work_dir: Path,
    report: TrainReport,
    progress: Progress | None = None,
    eval_examples: list[CutExample] | None = None,
) -> Any:
    """A ``Trainer`` whose loss is CUT's, over ``examples`` (each batch a list of them);
    evaluated on ``eval_examples`` (default: up to EVAL_EXAMPLES of ``examples``)."""
    from transformers import Trainer, TrainingArguments

    class _CutTrainer(Trainer):  # type: ignore[misc]
        def compute_loss(
            self, model: Any, inputs: Any, return_outputs: bool = False, **_: Any
        ) -> Any:
            batch: list[CutExample] = inputs["examples"]
            losses = [example_loss(model, example, config) for example in batch]
            loss = sum(out.loss for out in losses) / len(losses)
            if model.training:
                report.examples += len(batch)
                report.tokens += sum(e.tokens for e in batch)
                report.response_tokens += sum(e.response_len for e in batch)
                report.flagged_tokens += sum(int(out.flagged.sum()) for out in losses)
            return (loss, None) if return_outputs else loss

        def prediction_step(self, model: Any, inputs: Any, *_: Any, **__: Any) -> Any:
            import torch

            with torch.no_grad():
                return self.compute_loss(model, inputs).detach(), None, None

    args = trainer_arguments(
        TrainingArguments, config, work_dir, len(examples), remove_unused_columns=False
    )
    report.warmup_steps = args.warmup_steps
    return _CutTrainer(
        model=model,
        args=args,
        train_dataset=examples,
        eval_dataset=eval_examples or examples[:EVAL_EXAMPLES],
        data_collator=lambda batch: {"examples": batch},
        callbacks=[progress_callback(progress, report)],
    )


def train(
    model: Any,
    examples: list[CutExample],
    config: CutConfig,
    progress: Progress | None = None,
    *,
    evaluate: bool = True,
    eval_examples: list[CutExample] | None = None,
) -> TrainReport:
    if not examples:
        raise ValueError("no training examples")
    report = TrainReport(method="cut")
    with tempfile.TemporaryDirectory(prefix="aligngate-cut-") as work:
        trainer = cut_trainer(model, examples, config, Path(work), report, progress, eval_examples)
        run(trainer, report, evaluate=evaluate)
    return report


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
    eval_data: Path | None = None,
) -> tuple[Path, TrainReport, CutDataset]:
    """Data file → examples (with the served renderer) → LoRA training → adapter folder.
    ``eval_data``: held-out records (same format) the CUT loss is measured on before and
    after (default: up to 32 training examples)."""
    from server.training.cut_data import CutDataError, build_dataset, read_records

    config = placed(config)
    check_device_memory(base, config)
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
    held_out = None
    if eval_data is not None:
        held_records, held_sha = read_records(eval_data)
        held_out = build_dataset(
            renderer,
            held_records,
            sha256=held_sha,
            downsample_ratio=-1,  # every held-out record is measured
            cutoff=config.cutoff,
            seed=config.seed,
        ).examples
    model = load_trainable(base, config, init_adapter, trust_remote_code=trust_remote_code)
    judged = [e for e in dataset.examples if e.judge_ids is not None][:EFFECT_EXAMPLES]
    before = flagged_logprobs(model, judged, config)
    report = train(model, dataset.examples, config, progress, eval_examples=held_out)
    report.effect = measure_effect(before, flagged_logprobs(model, judged, config))
    log.info("Effect on its own judged data: %s", report.effect)
    save_adapter(
        model,
        out,
        method="cut",
        base=base,
        base_name=base_name,
        renderer=renderer,
        config=config,
        data={
            "path": str(data),
            "sha256": dataset.sha256,
            "examples": len(dataset.examples),
            "judged": dataset.judged,
            "fine": dataset.fine,
            "fine_dropped": dataset.fine_dropped,
            "skipped": dataset.skipped,
            "eval": str(eval_data) if eval_data else None,
        },
        report=report,
        init_adapter=init_adapter,
    )
    return out, report, dataset
