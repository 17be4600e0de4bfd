"""KTO and DPO, trained by TRL's own ``KTOTrainer`` and ``DPOTrainer`` on a LoRA of the base.
The reference model is the base with the adapter disabled, as TRL does for PEFT models (when
continuing an adapter, the reference is that adapter as it was: TRL keeps a frozen copy,
which is not saved with the adapter).

Data, in TRL's standard formats (what ``aligngate export --format trl-kto | dpo`` writes):
- KTO: ``{prompt, completion, label}`` (HALOs' ``{prompt: [messages], output: [{role:
  assistant, content}], label: 1 | 0}`` is read too);
- DPO: ``{prompt, chosen, rejected}``.
A prompt that is a list of messages is rendered by the family's template, exactly as the
served model receives it; a prompt that is a string is taken as already rendered (the
export's prompts are). Either way the BOS token appears once: TRL tokenizes prompts with
the tokenizer's own special tokens, so a BOS text the tokenizer would add again is dropped.

Owns: the two methods' configs, reading their files, running TRL. Does not know: HTTP, the
store, vLLM.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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

Preference = Literal["kto", "dpo"]


class PreferenceDataError(ValueError):
    """A training file that is not in the method's format."""


@dataclass(frozen=True)
class KtoConfig(TrainingArgs):
    """KTO (Ethayarajh et al. 2024) through TRL's ``KTOConfig``. The KL estimate pairs each
    prompt with another example's completion within a forward pass, so a micro-batch holds
    several examples (TRL refuses 1)."""

    learning_rate: float = _help("peak learning rate (cosine schedule)", default=1e-4)
    micro_batch_size: int = _help("examples per forward pass (KTO: at least 2)", default=8)
    beta: float = _help("KTO's beta: higher stays closer to the reference", default=0.1)
    desirable_weight: float = _help("weight of desirable examples' loss", default=1.0)
    undesirable_weight: float = _help("weight of undesirable examples' loss", default=1.0)


@dataclass(frozen=True)
class DpoConfig(TrainingArgs):
    """DPO (Rafailov et al. 2023) through TRL's ``DPOConfig``."""

    learning_rate: float = _help("peak learning rate (cosine schedule)", default=1e-4)
    beta: float = _help("DPO's beta: higher stays closer to the reference", default=0.1)
    loss_type: str = _help("TRL's DPO loss (sigmoid, ipo, hinge, robust, ...)", default="sigmoid")


def _text(value: Any, what: str, i: int) -> str:
    """A completion: a string, or TRL's / HALOs' one assistant message."""
    if isinstance(value, str):
        return value
    if (
        isinstance(value, list)
        and len(value) == 1
        and isinstance(value[0], dict)
        and value[0].get("role") == "assistant"
        and isinstance(value[0].get("content"), str)
    ):
        return str(value[0]["content"])
    raise PreferenceDataError(f"record {i}: `{what}` must be a string or one assistant message")


def prompt_text(renderer: Renderer, prompt: Any, i: int) -> str:
    """The prompt as TRL should tokenize it: a conversation rendered by the family's
    template; BOS once, whether the tokenizer adds it or the text carries it."""
    if isinstance(prompt, list):
        try:
            messages = [Message(str(m["role"]), str(m["content"])) for m in prompt]
        except (KeyError, TypeError) as exc:
            raise PreferenceDataError(
                f"record {i}: `prompt` messages are {{role, content}} objects"
            ) from exc
        rendered = renderer.render_chat(messages)
        text = rendered.text
        tok = renderer.tokenizer
        if (
            tok.bos_token_id is not None
            and rendered.token_ids[:1] == [tok.bos_token_id]
            and not text.startswith(tok.bos_token or "\0")
        ):
            text = tok.bos_token + text
    elif isinstance(prompt, str):
        text = prompt
    else:
        raise PreferenceDataError(f"record {i}: `prompt` must be a string or a list of messages")
    return _bos_once(renderer.tokenizer, text)


def _bos_once(tokenizer: Any, text: str) -> str:
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):
        added = tokenizer("x").input_ids
        if added[:1] == [tokenizer.bos_token_id]:
            return text[len(bos) :]  # the tokenizer puts it back
    return text


def read_rows(method: Preference, renderer: Renderer, path: Path) -> tuple[list[dict], str]:
    """The file's records as TRL rows (prompt text rendered), and the file's sha256."""
    try:
        raw_bytes = path.read_bytes()
        raw = json.loads(raw_bytes)
    except (OSError, json.JSONDecodeError) as exc:
        raise PreferenceDataError(f"cannot read {method} training file {path}: {exc}") from exc
    if not isinstance(raw, list):
        raise PreferenceDataError(f"{path}: a {method} training file is a JSON list of records")
    rows = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or "prompt" not in item:
            raise PreferenceDataError(f"record {i}: an object with a `prompt`")
        prompt = prompt_text(renderer, item["prompt"], i)
        if method == "kto":
            completion = _text(item.get("completion", item.get("output")), "completion", i)
            label = item.get("label")
            if label not in (True, False, 0, 1):
                raise PreferenceDataError(f"record {i}: `label` must be true/false (or 1/0)")
            rows.append({"prompt": prompt, "completion": completion, "label": bool(label)})
        else:
            chosen = _text(item.get("chosen"), "chosen", i)
            rejected = _text(item.get("rejected"), "rejected", i)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows, hashlib.sha256(raw_bytes).hexdigest()


def summary(method: Preference, rows: list[dict]) -> dict[str, int]:
    if method == "kto":
        desirable = sum(1 for r in rows if r["label"])
        return {"examples": len(rows), "desirable": desirable, "undesirable": len(rows) - desirable}
    return {"examples": len(rows), "pairs": len(rows)}


def trl_trainer(
    method: Preference,
    model: Any,
    tokenizer: Any,
    rows: list[dict],
    eval_rows: list[dict],
    config: KtoConfig | DpoConfig,
    work_dir: Path,
    report: TrainReport,
    progress: Progress | None = None,
) -> Any:
    from datasets import Dataset

    common = {"max_length": config.cutoff, "beta": config.beta, "dataset_num_proc": None}
    if method == "kto":
        from trl import KTOConfig, KTOTrainer

        assert isinstance(config, KtoConfig)
        if config.forward_batch < 2:
            raise ValueError("KTO needs --micro-batch-size of at least 2 (its KL estimate)")
        trainer_cls: Any = KTOTrainer
        args = trainer_arguments(
            KTOConfig,
            config,
            work_dir,
            len(rows),
            desirable_weight=config.desirable_weight,
            undesirable_weight=config.undesirable_weight,
            **common,
        )
    else:
        from trl import DPOConfig, DPOTrainer

        assert isinstance(config, DpoConfig)
        trainer_cls = DPOTrainer
        args = trainer_arguments(
            DPOConfig, config, work_dir, len(rows), loss_type=[config.loss_type], **common
        )
    report.warmup_steps = args.warmup_steps
    return trainer_cls(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(eval_rows),
        processing_class=tokenizer,
        callbacks=[progress_callback(progress, report)],
    )


def train_preference_adapter(
    method: Preference,
    *,
    base: Path,
    data: Path,
    out: Path,
    config: KtoConfig | DpoConfig,
    eval_data: Path | None = None,
    family: str | None = None,
    template: str | None = None,
    base_name: str | None = None,
    init_adapter: Path | None = None,
    progress: Progress | None = None,
    trust_remote_code: bool = False,
) -> tuple[Path, TrainReport]:
    """Data file → TRL rows (prompts rendered as served) → KTO or DPO on a LoRA → adapter
    folder. The report's ``before``/``after`` are TRL's metrics on ``eval_data`` (held out)
    or on a sample of the training data."""
    config = placed(config)
    check_device_memory(base, config)
    renderer = Renderer.load(
        base, family_name=family, template=template, trust_remote_code=trust_remote_code
    )
    rows, sha256 = read_rows(method, renderer, data)
    if not rows:
        raise PreferenceDataError(f"{data}: no {method} records")
    if method == "kto" and len({r["label"] for r in rows}) < 2:
        only = "desirable" if rows[0]["label"] else "undesirable"
        log.warning("KTO data holds only %s examples", only)
    eval_rows = read_rows(method, renderer, eval_data)[0] if eval_data else rows[:EVAL_EXAMPLES]
    log.info("%s data: %s", method.upper(), summary(method, rows))
    model = load_trainable(base, config, init_adapter, trust_remote_code=trust_remote_code)
    report = TrainReport(method=method, examples=len(rows))
    with tempfile.TemporaryDirectory(prefix=f"aligngate-{method}-") as work:
        trainer = trl_trainer(
            method,
            model,
            renderer.tokenizer,
            rows,
            eval_rows,
            config,
            Path(work),
            report,
            progress,
        )
        run(trainer, report)
    save_adapter(
        model,
        out,
        method=method,
        base=base,
        base_name=base_name,
        renderer=renderer,
        config=config,
        data={
            "path": str(data),
            "sha256": sha256,
            **summary(method, rows),
            "eval": str(eval_data) if eval_data else None,
        },
        report=report,
        init_adapter=init_adapter,
    )
    return out, report
