"""Quark as ALT trains it (``sauc-abadal/ALT``, ``alt/trainer/quark_trainer.py``): the input is
the reward-quantile token followed directly by the prompt, the target is ``" " + generation +
EOS``, and the loss on each response token is

    −log π_θ(y_t)  +  kl_coef · KL(π_ref ‖ π_θ)  −  entropy_coef · H(π_θ)

averaged over the response tokens of a batch. π_ref is the base with the adapter disabled,
shown the prompt without its quantile token (ALT's ``remove_quantile_from_prompt_input_ids``);
the KL is ALT's direction (``KLDivLoss(log π_θ, π_ref)``: Σ π_ref (log π_ref − log π_θ)).
Coefficients are ALT's TL;DR config: kl_coef 0.05, entropy_coef 0.06. (ALT's launched TL;DR
run used its no-KL trainer; the KL term is the method as its paper and config state it.)

Data: the export's data pool (``aligngate export --format quark``), one object per prompt
with ``generations``, ``rewards`` and ``quantile_tokens`` (best first), as ALT's data pool
stores it. A pool without ``quantile_tokens`` — or with tokens that are not this model's
(the export writes the default five) but with ``rewards`` — is quantised here by the same
rule (``feedback.quantiles``) with this model's number of tokens.

Owns: Quark's config, examples and loss. Does not know: HTTP, the store, vLLM.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from server.models.render import Message, Renderer
from server.training.arguments import TrainingArgs, _help, placed
from server.training.loop import (
    EVAL_EXAMPLES,
    Progress,
    TrainReport,
    check_device_memory,
    load_trainable,
    progress_callback,
    run,
    save_adapter,
    trainer_arguments,
)

log = logging.getLogger(__name__)


class QuarkDataError(ValueError):
    """A training file that is not a Quark data pool."""


@dataclass(frozen=True)
class QuarkConfig(TrainingArgs):
    """Quark's settings; coefficients from ALT's TL;DR config."""

    learning_rate: float = _help("peak learning rate (cosine schedule)", default=1e-4)
    # The loss is a mean over the response tokens of a forward pass: a micro-batch of the
    # whole batch makes it ALT's mean over the batch's tokens (smaller ones average their
    # micro-batches' means).
    micro_batch_size: int = _help(
        "examples per forward pass (accumulated to --batch-size)", default=8
    )
    kl_coef: float = _help("weight of KL(reference ‖ policy) per token", default=0.05)
    entropy_coef: float = _help("weight of the entropy bonus per token", default=0.06)


@dataclass(frozen=True, slots=True)
class QuarkExample:
    """``policy_ids``: quantile token + prompt + response; ``reference_ids``: prompt +
    response. The response is the last ``response_len`` ids of both."""

    policy_ids: list[int]
    reference_ids: list[int]
    response_len: int
    quantile: int


class _Scored(NamedTuple):
    prompt: str
    reward: float


def read_pool(path: Path, tokens: tuple[str, ...]) -> tuple[list[tuple[str, str, int]], str]:
    """(prompt, generation, quantile index) per generation, and the file's sha256."""
    from server.feedback.quantiles import quantile_pools

    try:
        raw_bytes = path.read_bytes()
        raw = json.loads(raw_bytes)
    except (OSError, json.JSONDecodeError) as exc:
        raise QuarkDataError(f"cannot read Quark training file {path}: {exc}") from exc
    if not isinstance(raw, list):
        raise QuarkDataError(f"{path}: a Quark data pool is a JSON list, one object per prompt")
    found: list[tuple[str, str, int | None, float | None]] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise QuarkDataError(f"record {i}: an object with a string `prompt`")
        generations = item.get("generations")
        if not isinstance(generations, list) or not all(isinstance(g, str) for g in generations):
            raise QuarkDataError(f"record {i}: `generations` must be a list of strings")
        given = item.get("quantile_tokens")
        rewards = item.get("rewards")
        if given is not None and isinstance(rewards, list) and not set(given) <= set(tokens):
            given = None  # another model's tokens (the export's default five): by reward
        if given is not None:
            if not isinstance(given, list) or len(given) != len(generations):
                raise QuarkDataError(f"record {i}: one quantile token per generation")
            unknown = sorted({t for t in given if t not in tokens})
            if unknown:
                raise QuarkDataError(
                    f"record {i}: {', '.join(map(repr, unknown))} are not this model's "
                    f"quantile tokens ({', '.join(tokens)})"
                )
            found += [
                (item["prompt"], g, tokens.index(t), None)
                for g, t in zip(generations, given, strict=True)
            ]
        elif isinstance(rewards, list) and len(rewards) == len(generations):
            if not all(isinstance(r, int | float) for r in rewards):
                raise QuarkDataError(f"record {i}: `rewards` must be numbers")
            found += [
                (item["prompt"], g, None, float(r))
                for g, r in zip(generations, rewards, strict=True)
            ]
        else:
            raise QuarkDataError(f"record {i}: give `quantile_tokens` or `rewards` per generation")
    unassigned = [_Scored(p, r) for p, _, q, r in found if q is None and r is not None]
    assigned = iter(quantile_pools(unassigned, len(tokens)))
    out = [(p, g, q if q is not None else next(assigned)) for p, g, q, _ in found]
    return out, hashlib.sha256(raw_bytes).hexdigest()


def build_example(
    renderer: Renderer, prompt: str, generation: str, quantile: int, cutoff: int
) -> QuarkExample | None:
    tok = renderer.tokenizer
    policy = renderer.render_chat([Message("user", prompt)], quantile=quantile).token_ids
    reference = renderer.plain_ids(prompt.strip())
    response = list(tok(" " + generation.strip(), add_special_tokens=False)["input_ids"])
    if tok.eos_token_id is not None:
        response.append(tok.eos_token_id)
    if len(response) < 2:
        return None  # nothing but EOS
    policy_ids = (policy + response)[-cutoff:]
    reference_ids = (reference + response)[-cutoff:]
    n = min(len(response), len(policy_ids) - 1, len(reference_ids) - 1)
    return QuarkExample(policy_ids, reference_ids, n, quantile)


def response_logits(model: Any, ids: list[int], response_len: int) -> Any:
    """Logits predicting the last ``response_len`` tokens of ``ids`` ([T, V], float32)."""
    import torch

    device = next(model.parameters()).device
    tensor = torch.tensor([ids], device=device)
    logits = model(input_ids=tensor, logits_to_keep=response_len + 1).logits[0, :-1]
    return logits.float()


@dataclass
class QuarkTerms:
    loss: Any  # sum over the response tokens (differentiable)
    nll: float
    kl: float
    entropy: float
    tokens: int


def example_terms(model: Any, example: QuarkExample, config: QuarkConfig) -> QuarkTerms:
    import torch

    n = example.response_len
    targets = torch.tensor(example.policy_ids[-n:], device=next(model.parameters()).device)
    logp = torch.log_softmax(response_logits(model, example.policy_ids, n), dim=-1)
    with torch.no_grad(), model.disable_adapter():
        ref_logp = torch.log_softmax(response_logits(model, example.reference_ids, n), dim=-1)
    nll = -logp.gather(-1, targets[:, None]).squeeze(-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    per_token = nll + config.kl_coef * kl - config.entropy_coef * entropy
    return QuarkTerms(
        loss=per_token.sum(),
        nll=float(nll.detach().sum()),
        kl=float(kl.detach().sum()),
        entropy=float(entropy.detach().sum()),
        tokens=n,
    )


def quark_trainer(
    model: Any,
    examples: list[QuarkExample],
    eval_examples: list[QuarkExample],
    config: QuarkConfig,
    work_dir: Path,
    report: TrainReport,
    progress: Progress | None = None,
) -> Any:
    from transformers import Trainer, TrainingArguments

    sums = {"nll": 0.0, "kl": 0.0, "entropy": 0.0, "tokens": 0}

    class _QuarkTrainer(Trainer):  # type: ignore[misc]
        def compute_loss(
            self, model: Any, inputs: Any, return_outputs: bool = False, **_: Any
        ) -> Any:
            terms = [example_terms(model, e, config) for e in inputs["examples"]]
            tokens = sum(t.tokens for t in terms)
            loss = sum(t.loss for t in terms) / tokens
            if model.training:
                report.examples += len(terms)
                report.tokens += sum(len(e.policy_ids) for e in inputs["examples"])
                report.response_tokens += tokens
                for t in terms:
                    sums["nll"] += t.nll
                    sums["kl"] += t.kl
                    sums["entropy"] += t.entropy
                    sums["tokens"] += t.tokens
            return (loss, None) if return_outputs else loss

        def prediction_step(self, model: Any, inputs: Any, *_: Any, **__: Any) -> Any:
            import torch

            with torch.no_grad():
                return self.compute_loss(model, inputs).detach(), None, None

        def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            if "loss" in logs and sums["tokens"]:
                # per response token since the last log: the loss's three terms
                for name in ("nll", "kl", "entropy"):
                    logs[name] = round(sums[name] / sums["tokens"], 6)
                sums.update(nll=0.0, kl=0.0, entropy=0.0, tokens=0)
            super().log(logs, *args, **kwargs)

    args = trainer_arguments(
        TrainingArguments, config, work_dir, len(examples), remove_unused_columns=False
    )
    report.warmup_steps = args.warmup_steps
    return _QuarkTrainer(
        model=model,
        args=args,
        train_dataset=examples,
        eval_dataset=eval_examples,
        data_collator=lambda batch: {"examples": batch},
        callbacks=[progress_callback(progress, report)],
    )


def train_quark_adapter(
    *,
    base: Path,
    data: Path,
    out: Path,
    config: QuarkConfig,
    eval_data: Path | None = None,
    family: str | None = None,
    template: str | None = None,
    base_name: str | None = None,
    init_adapter: Path | None = None,
    progress: Progress | None = None,
    trust_remote_code: bool = False,
    quantile_tokens: list[str] | None = None,
) -> tuple[Path, TrainReport]:
    """Data pool → (quantile token + prompt → response) examples → Quark on a LoRA."""
    config = placed(config)
    check_device_memory(base, config)
    renderer = Renderer.load(
        base,
        family_name=family,
        template=template,
        trust_remote_code=trust_remote_code,
        quantile_tokens=quantile_tokens,
    )
    if not renderer.quantile_tokens:
        raise QuarkDataError(
            f"{base} is served as the {renderer.family} family, without quantile tokens; "
            "Quark trains a model of the quark family"
        )

    def examples_of(path: Path) -> tuple[list[QuarkExample], str, int]:
        items, sha = read_pool(path, renderer.quantile_tokens)
        built = [build_example(renderer, p, g, q, config.cutoff) for p, g, q in items]
        kept = [e for e in built if e is not None]
        return kept, sha, len(built) - len(kept)

    examples, sha256, skipped = examples_of(data)
    if not examples:
        raise QuarkDataError(f"{data}: no usable generations")
    eval_examples = examples_of(eval_data)[0] if eval_data else examples[:EVAL_EXAMPLES]
    counts = [
        sum(1 for e in examples if e.quantile == k) for k in range(len(renderer.quantile_tokens))
    ]
    log.info("Quark data: %d generations, per quantile %s", len(examples), counts)
    model = load_trainable(base, config, init_adapter, trust_remote_code=trust_remote_code)
    report = TrainReport(method="quark")
    with tempfile.TemporaryDirectory(prefix="aligngate-quark-") as work:
        trainer = quark_trainer(
            model, examples, eval_examples, config, Path(work), report, progress
        )
        run(trainer, report)
    save_adapter(
        model,
        out,
        method="quark",
        base=base,
        base_name=base_name,
        renderer=renderer,
        config=config,
        data={
            "path": str(data),
            "sha256": sha256,
            "examples": len(examples),
            "per_quantile": counts,
            "skipped": skipped,
            "eval": str(eval_data) if eval_data else None,
        },
        report=report,
        init_adapter=init_adapter,
    )
    return out, report
