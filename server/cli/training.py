"""The training commands of the ``aligngate`` CLI: ``train cut``, ``merge``, ``align``.

Owns: their arguments and console output (a progress bar with the loss). The work itself is
in ``server.training``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from server.settings import Settings

log = logging.getLogger("aligngate")

DEFAULT_SERVER = "http://127.0.0.1:8000"


# CUT's settings as flags of `train cut` and `align`: (flag, CutConfig field, type, help).
# Their defaults are CutConfig's (`train cut`) or the server's (`align`), never repeated here.
CUT_FLAGS: tuple[tuple[str, str, type, str], ...] = (
    ("--threshold", "threshold", float, "p_A / p_B above this flags a token as an error"),
    ("--weight-unlike", "weight_unlike", float, "weight of the unlikelihood term"),
    ("--downsample", "downsample", float, "fine responses kept per judged one (<0: all)"),
    ("--lora-r", "lora_r", int, "LoRA rank"),
    ("--lora-alpha", "lora_alpha", int, "LoRA alpha (with --lora-r alone: the rank)"),
    ("--lora-dropout", "lora_dropout", float, "LoRA dropout"),
    ("--target-modules", "target_modules", str, "LoRA modules, comma-separated"),
    ("--lr", "learning_rate", float, "peak learning rate (cosine schedule)"),
    ("--warmup-steps", "warmup_steps", int, "linear warm-up steps, at most"),
    ("--warmup-ratio", "warmup_ratio", float, "warm-up as a fraction of the run's steps"),
    ("--batch-size", "batch_size", int, "examples per optimizer step"),
    ("--epochs", "epochs", int, "passes over the data"),
    ("--cutoff", "cutoff", int, "tokens per sequence; longer ones are cut from the left"),
    ("--seed", "seed", int, "random seed"),
    ("--dtype", "dtype", str, "training precision (auto: bfloat16 on GPUs, float32 on CPUs)"),
    ("--threads", "threads", int, "torch CPU threads"),
    ("--device", "device", str, "auto (CUDA when present), cpu, cuda or cuda:N"),
    ("--gradient-checkpointing", "gradient_checkpointing", bool, "recompute activations"),
)
# A server's iterations train where its resource plan says (models file `resources:`).
_NOT_PER_REQUEST = {"target_modules", "device", "gradient_checkpointing"}


def _add_cut_flags(parser: argparse.ArgumentParser, server_defaults: bool = False) -> None:
    """The CUT flags, all defaulting to None so that only those given override."""
    from server.training.trainer import CutConfig

    base = CutConfig()
    for flag, dest, kind, text in CUT_FLAGS:
        if server_defaults and dest in _NOT_PER_REQUEST:
            continue  # not a setting of the server's iterations
        default = getattr(base, dest)
        shown = ",".join(default) if isinstance(default, tuple) else default
        if server_defaults:
            shown = "the server's"
        if kind is bool:
            parser.add_argument(
                flag,
                dest=dest,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{text} (default: {shown})",
            )
            continue
        parser.add_argument(
            flag,
            dest=dest,
            type=kind,
            choices=["auto", "float32", "bfloat16"] if dest == "dtype" else None,
            help=f"{text} (default: {shown})",
        )


def _cut_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The CUT settings given as flags, by CutConfig field."""
    given = {d: getattr(args, d) for _, d, *_ in CUT_FLAGS if getattr(args, d, None) is not None}
    if isinstance(given.get("target_modules"), str):
        given["target_modules"] = tuple(given["target_modules"].split(","))  # type: ignore[union-attr]
    return given


def _cut_config(args: argparse.Namespace) -> object:
    """CutConfig's defaults, then ``--hyperparameters FILE``, then the flags; LoRA alpha
    follows the rank unless set."""
    import dataclasses

    from server.training.trainer import CutConfig

    base = CutConfig.from_json(args.hyperparameters) if args.hyperparameters else CutConfig()
    given = _cut_overrides(args)
    if "lora_r" in given and "lora_alpha" not in given:
        given["lora_alpha"] = given["lora_r"]
    return dataclasses.replace(base, **given)  # type: ignore[arg-type]


def _progress_writer(path: Path | None, bar: object):  # type: ignore[no-untyped-def]
    """After each optimizer step: advance the bar; append a JSON line to ``path``."""

    def progress(step: int, total: int, loss: float) -> None:
        bar.total = total  # type: ignore[attr-defined]
        bar.set_postfix(loss=f"{loss:.4f}")  # type: ignore[attr-defined]
        bar.update(1)  # type: ignore[attr-defined]
        if path is not None:
            with path.open("a") as f:
                f.write(json.dumps({"step": step, "total": total, "loss": loss}) + "\n")

    return progress


def _cmd_train_cut(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    from server.training.cut_data import CutDataError
    from server.training.trainer import TrainingMemoryError, placed, train_cut_adapter

    if args.out.exists() and not args.overwrite:
        log.error("%s exists; pass --overwrite to replace it", args.out)
        return 2
    try:
        # The device is decided (and a missing GPU refused) before anything loads.
        config = placed(_cut_config(args))  # type: ignore[arg-type]
    except (OSError, ValueError, TypeError) as exc:  # PlatformError is a ValueError
        log.error("%s", exc)
        return 2
    with tqdm(desc="CUT", unit="step", dynamic_ncols=True) as bar:
        try:
            out, report, dataset = train_cut_adapter(
                base=args.base,
                data=args.data,
                out=args.out,
                config=config,  # type: ignore[arg-type]
                family=args.family,
                template=args.template,
                base_name=args.base_name,
                init_adapter=args.init_adapter,
                progress=_progress_writer(args.progress_file, bar),
                trust_remote_code=args.trust_remote_code,
            )
        except (CutDataError, FileNotFoundError, ValueError, TrainingMemoryError) as exc:
            log.error("%s", exc)
            return 2
    summary = {"adapter": str(out), **report.as_dict(), "judged": dataset.judged}
    print(json.dumps(summary))
    return 0


def _cmd_merge(args: argparse.Namespace, settings: Settings) -> int:
    from server.resources.platform import PlatformError, detect, training_device
    from server.training.merge import MergeError, merge_adapter

    try:
        device = training_device(args.device, detect())
        result = merge_adapter(
            args.base,
            args.adapter,
            args.out,
            dtype=args.dtype,
            device=device.torch_device,
            trust_remote_code=args.trust_remote_code,
        )
    except (MergeError, PlatformError) as exc:
        log.error("%s", exc)
        return 2
    log.info("%s %s", "merged into" if result.merged else "already merged:", result.out)
    print(result.out)
    return 0


def _align_hyperparameters(args: argparse.Namespace) -> dict[str, object]:
    return _cut_overrides(args)


def _cmd_align(args: argparse.Namespace, settings: Settings) -> int:
    if args.device is not None and args.config is None:
        log.error("--device needs --config; a server trains where its resource plan says")
        return 2
    if args.config is not None:
        code, job = _align_offline(args, settings)
        if code == 0 and args.server:
            code = _hot_load(args, settings, job["adapter"])
        return code
    if args.merge_out is not None:
        log.error("--merge-out needs --config (the iteration then runs in this process)")
        return 2
    return _align_on_server(args, settings)


def _admin_headers(args: argparse.Namespace, settings: Settings) -> dict[str, str]:
    key = args.admin_key or settings.admin_key
    return {"authorization": f"Bearer {key}"} if key else {}


def _align_on_server(args: argparse.Namespace, settings: Settings) -> int:
    """One online iteration on a live gateway: POST /admin/align, then follow the job."""
    import time

    import httpx

    body = {
        "model": args.model,
        "since": args.since,
        "min_judged": args.min_judged,
        "hyperparameters": _align_hyperparameters(args),
        "trusted_annotators": args.trusted_annotator or [],
        "include_unreviewed": args.include_unreviewed,
    }
    url = (args.server or DEFAULT_SERVER).rstrip("/")
    with httpx.Client(timeout=30, headers=_admin_headers(args, settings)) as client:
        response = client.post(f"{url}/admin/align", json=body)
        if response.status_code != 202:
            log.error("align refused (%d): %s", response.status_code, response.text)
            return 2
        job = response.json()
        log.info("align job %s started: %s", job["id"], job["adapter"] or args.model)
        last = None
        while job["status"] not in ("succeeded", "failed"):
            time.sleep(1)
            job = client.get(f"{url}/admin/align/{job['id']}").json()
            state = (job["status"], job["step"])
            if state != last:
                log.info(
                    "%s step %s/%s loss %s",
                    job["status"],
                    job["step"],
                    job["total_steps"],
                    job["loss"],
                )
                last = state
    print(json.dumps(job, indent=2))
    return 0 if job["status"] == "succeeded" else 1


def _align_offline(args: argparse.Namespace, settings: Settings) -> tuple[int, dict[str, object]]:
    """The iteration in this process, from the models file and the store (no server needed):
    the adapter lands under the adapters root; ``--merge-out`` also merges it into a new
    base checkpoint for the next round."""
    import asyncio
    import uuid

    from pydantic import ValidationError

    from server.feedback.service import parse_since
    from server.models.models_file import ModelsFileError, load_deployment
    from server.protocol import CutHyperparameters
    from server.store import Store
    from server.training.merge import MergeError, merge_adapter
    from server.training.online import AlignJob, run_iteration
    from server.training.service import cut_config, plan_offline, trusted_for
    from server.training.trainer import placed

    try:
        deployment = load_deployment(args.config)
        training = deployment.resources.training
        config = dataclasses.replace(
            cut_config(CutHyperparameters(**_align_hyperparameters(args))),
            device=args.device or training.device,
            gradient_checkpointing=training.gradient_checkpointing,
        )
        config = placed(config)  # a missing GPU is refused here, before anything loads
        trusted = trusted_for(settings, args.trusted_annotator or [], args.include_unreviewed)
        plan = plan_offline(
            deployment.models, settings, args.model, parse_since(args.since), trusted
        )
    except (ValidationError, ModelsFileError, ValueError) as exc:
        log.error("%s", exc)
        return 2, {}
    job = AlignJob(id=f"align-{uuid.uuid4().hex[:12]}", model=args.model)
    log.info("iteration %d on `%s`: training %s", plan.iteration, args.model, plan.out)
    store = Store.open(settings.store_url())
    try:
        asyncio.run(run_iteration(plan, store, config, job, min_records=args.min_judged))
    finally:
        store.close()
    result = job.public()
    if job.status == "succeeded" and args.merge_out is not None:
        try:
            merged = merge_adapter(
                plan.base_path,
                plan.out,
                args.merge_out,
                device=config.device,
                trust_remote_code=plan.trust_remote_code,
            )
        except MergeError as exc:
            log.error("%s", exc)
            return 2, result
        result["merged"] = str(merged.out)
    print(json.dumps(result, indent=2))
    return (0 if job.status == "succeeded" else 1), result


def _hot_load(args: argparse.Namespace, settings: Settings, name: object) -> int:
    import httpx

    url = args.server.rstrip("/")
    body = {"name": name, "path": name}
    with httpx.Client(timeout=120, headers=_admin_headers(args, settings)) as client:
        response = client.post(f"{url}/admin/adapters", json=body)
    if response.status_code != 201:
        log.error("hot-load refused (%d): %s", response.status_code, response.text)
        return 1
    log.info("serving `%s` on %s", name, url)
    return 0


def add_training_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    train = sub.add_parser("train", help="train an adapter on collected judgments")
    train_sub = train.add_subparsers(dest="method", required=True)
    cut = train_sub.add_parser(
        "cut", help="CUT: contrastive unlikelihood on judgments, LoRA (DESIGN.md §7)"
    )
    cut.add_argument("--base", type=Path, required=True, help="base checkpoint folder")
    cut.add_argument(
        "--data",
        type=Path,
        required=True,
        help="CUT-format JSON (the CUT repo's, or `aligngate export --format cut`)",
    )
    cut.add_argument("--out", type=Path, required=True, help="adapter folder to write")
    cut.add_argument("--family", help="prompt format (default: as the registry detects it)")
    cut.add_argument("--template", help="a template file replacing the family's")
    cut.add_argument("--base-name", help="the served model name of the base (metadata)")
    cut.add_argument("--init-adapter", type=Path, help="continue training this adapter")
    cut.add_argument(
        "--hyperparameters",
        type=Path,
        help="CUT settings as JSON (CutConfig's fields); flags override it",
    )
    _add_cut_flags(cut)
    cut.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the checkpoint's own code (as its models-file entry allows)",
    )
    cut.add_argument("--progress-file", type=Path, help="append one JSON line per step")
    cut.add_argument("--overwrite", action="store_true")
    cut.set_defaults(func=_cmd_train_cut)

    merge = sub.add_parser("merge", help="merge a LoRA adapter into its base (a plain checkpoint)")
    merge.add_argument("--base", type=Path, required=True)
    merge.add_argument("--adapter", type=Path, required=True)
    merge.add_argument("--out", type=Path, required=True)
    merge.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    merge.add_argument(
        "--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N"
    )
    merge.add_argument("--trust-remote-code", action="store_true")
    merge.set_defaults(func=_cmd_merge)

    align = sub.add_parser(
        "align",
        help="one online-alignment iteration on a live gateway: judgments → CUT → hot-load",
    )
    align.add_argument("--model", required=True, help="served model whose judgments to use")
    align.add_argument(
        "--config",
        type=Path,
        help="models file: run the iteration in this process instead of on a server",
    )
    align.add_argument(
        "--server",
        help=f"the gateway's URL (default {DEFAULT_SERVER}); with --config: hot-load the "
        "new adapter there",
    )
    align.add_argument(
        "--merge-out",
        type=Path,
        help="with --config: also merge the new adapter into its base, written here",
    )
    align.add_argument("--since", help="judgments from this time on (default: since the last)")
    align.add_argument("--min-judged", type=int, default=1)
    align.add_argument(
        "--device",
        help="with --config: auto, cpu, cuda or cuda:N (default: the models file's "
        "resources.training.device)",
    )
    align.add_argument(
        "--trusted-key",
        "--trusted-annotator",
        dest="trusted_annotator",
        action="append",
        help="train on the judgments posted with this API key id without review (repeat)",
    )
    align.add_argument(
        "--include-unreviewed",
        action="store_true",
        help="train on every judgment, reviewed or not (poisoning risk: see README)",
    )
    align.add_argument("--admin-key", help="default: ALIGNGATE_ADMIN_KEY")
    _add_cut_flags(align, server_defaults=True)
    align.set_defaults(func=_cmd_align)
