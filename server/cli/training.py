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


# Flags whose name differs from their config field (``--lr`` is what trainers' users type).
_FLAG_NAMES = {"learning_rate": "--lr"}
# A server's iterations train where its resource plan says (models file `resources:`).
_NOT_PER_REQUEST = {"target_modules", "device", "gradient_checkpointing"}


def _flag(name: str) -> str:
    return _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def _config_fields(configs: list[type]) -> dict[str, tuple[str, str]]:
    """field → (type annotation, help), over ``configs`` (their union, first wins)."""
    from server.training.arguments import field_help

    fields: dict[str, tuple[str, str]] = {}
    for config in configs:
        for name, kind, text in field_help(config):
            fields.setdefault(name, (str(kind), text))
    return fields


def _add_config_flags(
    parser: argparse.ArgumentParser, configs: list[type], server_defaults: bool = False
) -> None:
    """A flag per config field, all defaulting to None so that only those given override.
    ``configs``: one method's config (``train``) or all of them (``align``)."""
    import dataclasses

    defaults = {} if server_defaults else dataclasses.asdict(configs[0]())
    for dest, (kind, text) in _config_fields(configs).items():
        if server_defaults and dest in _NOT_PER_REQUEST:
            continue  # not a setting of the server's iterations
        default = defaults.get(dest)
        shown = ",".join(default) if isinstance(default, tuple | list) else default
        if server_defaults:
            shown = "the method's"
        help_text = f"{text} (default: {shown})"
        if kind == "bool":
            parser.add_argument(
                _flag(dest),
                dest=dest,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
            continue
        parser.add_argument(
            _flag(dest),
            dest=dest,
            type=int if kind.startswith("int") else float if kind == "float" else str,
            choices=["auto", "float32", "bfloat16"] if dest == "dtype" else None,
            help=help_text,
            metavar=None if dest == "dtype" else dest.upper(),
        )


def _config_overrides(args: argparse.Namespace, configs: list[type]) -> dict[str, object]:
    """The settings given as flags, by config field."""
    given = {
        d: getattr(args, d) for d in _config_fields(configs) if getattr(args, d, None) is not None
    }
    if isinstance(given.get("target_modules"), str):
        given["target_modules"] = tuple(given["target_modules"].split(","))  # type: ignore[union-attr]
    return given


def _method_config(args: argparse.Namespace) -> object:
    """The method's defaults, then ``--hyperparameters FILE``, then the flags; LoRA alpha
    follows the rank unless set."""
    import dataclasses

    from server.training.methods import method

    config_class = method(args.method).config_class()
    base = config_class.from_json(args.hyperparameters) if args.hyperparameters else None
    given = _config_overrides(args, [config_class])
    if base is None:
        return config_class.from_dict(given)
    if "lora_r" in given and "lora_alpha" not in given:
        given["lora_alpha"] = given["lora_r"]
    return dataclasses.replace(base, **given)  # type: ignore[arg-type]


def _progress_writer(path: Path | None, bar: object):  # type: ignore[no-untyped-def]
    """After each optimizer step: advance the bar; append a JSON line to ``path``."""

    def progress(step: int, total: int, loss: float) -> None:
        if bar.total != total:  # type: ignore[attr-defined]
            bar.set_total(total)  # type: ignore[attr-defined]
        bar.note(f"loss {loss:.4f}")  # type: ignore[attr-defined]
        bar.update(step - bar.done)  # type: ignore[attr-defined]
        if path is not None:
            with path.open("a") as f:
                f.write(json.dumps({"step": step, "total": total, "loss": loss}) + "\n")

    return progress


def _train(args: argparse.Namespace, config: object, progress: object) -> dict[str, object]:
    """Run ``args.method`` and return the summary line's fields."""
    common = {
        "base": args.base,
        "data": args.data,
        "out": args.out,
        "config": config,
        "family": args.family,
        "template": args.template,
        "base_name": args.base_name,
        "init_adapter": args.init_adapter,
        "progress": progress,
        "trust_remote_code": args.trust_remote_code,
    }
    if args.method == "cut":
        from server.training.trainer import train_cut_adapter

        out, report, dataset = train_cut_adapter(**common, eval_data=args.eval_data)  # type: ignore[arg-type]
        return {"adapter": str(out), **report.as_dict(), "judged": dataset.judged}
    if args.method == "quark":
        from server.training.quark import train_quark_adapter

        tokens = args.quantile_tokens.split(",") if args.quantile_tokens else None
        out, report = train_quark_adapter(
            **common,  # type: ignore[arg-type]
            eval_data=args.eval_data,
            quantile_tokens=tokens,
        )
        return {"adapter": str(out), **report.as_dict()}
    from server.training.preference import train_preference_adapter

    out, report = train_preference_adapter(
        args.method,
        **common,  # type: ignore[arg-type]
        eval_data=args.eval_data,
    )
    return {"adapter": str(out), **report.as_dict()}


def _cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from server.telemetry.progress import Progress
    from server.training.cut_data import CutDataError
    from server.training.loop import TrainingMemoryError
    from server.training.preference import PreferenceDataError
    from server.training.quark import QuarkDataError
    from server.training.trainer import placed

    if args.out.exists() and not args.overwrite:
        log.error("%s exists; pass --overwrite to replace it", args.out)
        return 2
    try:
        # The device is decided (and a missing GPU refused) before anything loads.
        config = placed(_method_config(args))  # type: ignore[arg-type]
    except (OSError, ValueError, TypeError) as exc:  # PlatformError is a ValueError
        log.error("%s", exc)
        return 2
    with Progress(args.method.upper(), unit="step") as bar:
        try:
            summary = _train(args, config, _progress_writer(args.progress_file, bar))
        except (
            CutDataError,
            PreferenceDataError,
            QuarkDataError,
            FileNotFoundError,
            ValueError,
            TrainingMemoryError,
        ) as exc:
            log.error("%s", exc)
            return 2
    print(json.dumps(summary))
    return 0


def _cmd_merge(args: argparse.Namespace, settings: Settings) -> int:
    from server.resources.platform import PlatformError, detect, training_device
    from server.telemetry.progress import Progress
    from server.training.merge import MergeError, merge_adapter

    try:
        device = training_device(args.device, detect())
        with Progress("merge", 3, unit="step") as progress:
            result = merge_adapter(
                args.base,
                args.adapter,
                args.out,
                dtype=args.dtype,
                device=device.torch_device,
                trust_remote_code=args.trust_remote_code,
                progress=progress,
            )
    except (MergeError, PlatformError) as exc:
        log.error("%s", exc)
        return 2
    log.info("%s %s", "merged into" if result.merged else "already merged:", result.out)
    print(result.out)
    return 0


# train METHOD: (help, --data help)
TRAIN_METHODS = {
    "cut": (
        "CUT: contrastive unlikelihood on judgments (CUT's own loss; docs: Training methods, "
        "docs/alignment/training-methods.md)",
        "CUT-format JSON (the CUT repo's, or `aligngate export --format cut`)",
    ),
    "kto": (
        "KTO on binary labels, with TRL's KTOTrainer",
        "TRL's unpaired format, a JSON list of {prompt, completion, label} "
        "(`aligngate export --format trl-kto`); HALOs' records are read too",
    ),
    "dpo": (
        "DPO on preference pairs, with TRL's DPOTrainer",
        "TRL's preference format, a JSON list of {prompt, chosen, rejected} "
        "(`aligngate export --format dpo`)",
    ),
    "quark": (
        "Quark as ALT trains it: quantile token + prompt → response, NLL + KL to the base",
        "ALT's data pool, a JSON list of {prompt, generations, rewards, quantile_tokens} "
        "(`aligngate export --format quark`)",
    ),
}


def _all_configs() -> list[type]:
    from server.training.methods import METHODS

    return [m.config_class() for m in METHODS.values()]


def _align_hyperparameters(args: argparse.Namespace) -> dict[str, object]:
    given = _config_overrides(args, _all_configs())
    # `align --device` picks where an offline iteration trains: not a request setting.
    return {k: v for k, v in given.items() if k not in _NOT_PER_REQUEST}


def read_key_file(path: Path) -> str:
    """The key on a key file's first line; a missing, unreadable or empty file is an error
    saying so (the key itself is never echoed)."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read the key file {path}: {exc.strerror or exc}") from exc
    key = lines[0].strip() if lines else ""
    if not key:
        raise ValueError(f"the key file {path} is empty; its first line is the key")
    return key


def _cmd_align(args: argparse.Namespace, settings: Settings) -> int:
    if args.admin_key_file is not None:
        try:  # read before anything runs: not after a training job, at the hot-load
            read_key_file(args.admin_key_file)
        except ValueError as exc:
            log.error("%s", exc)
            return 2
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
    key = (
        read_key_file(args.admin_key_file)
        if args.admin_key_file is not None
        else settings.admin_key
    )
    return {"authorization": f"Bearer {key}"} if key else {}


def _align_on_server(args: argparse.Namespace, settings: Settings) -> int:
    """One online iteration on a live gateway: POST /admin/align, then follow the job."""
    import time

    import httpx

    body = {
        "model": args.model,
        "since": args.since,
        "method": args.method,
        "min_examples": args.min_examples,
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

    from server.errors import GatewayError
    from server.feedback.service import parse_since
    from server.models.models_file import ModelsFileError, load_deployment
    from server.protocol import Hyperparameters
    from server.store import Store
    from server.telemetry.progress import Progress
    from server.training.arguments import placed
    from server.training.merge import MergeError, merge_adapter
    from server.training.online import AlignJob, run_iteration
    from server.training.service import method_config, plan_offline, trusted_for

    try:
        deployment = load_deployment(args.config)
        training = deployment.resources.training
        trusted = trusted_for(settings, args.trusted_annotator or [], args.include_unreviewed)
        plan = plan_offline(
            deployment.models, settings, args.model, parse_since(args.since), trusted, args.method
        )
        config = dataclasses.replace(
            method_config(plan.method, Hyperparameters(**_align_hyperparameters(args))),
            device=args.device or training.device,
            gradient_checkpointing=training.gradient_checkpointing,
        )
        config = placed(config)  # a missing GPU is refused here, before anything loads
    except (ValidationError, ModelsFileError, ValueError, GatewayError) as exc:
        log.error("%s", exc)
        return 2, {}
    job = AlignJob(id=f"align-{uuid.uuid4().hex[:12]}", model=args.model, method=plan.method)
    log.info(
        "iteration %d on `%s` (%s): training %s", plan.iteration, args.model, plan.method, plan.out
    )
    store = Store.open(settings.store_url())
    try:
        asyncio.run(run_iteration(plan, store, config, job, min_records=args.min_examples))
    finally:
        store.close()
    result = job.public()
    if job.status == "succeeded" and args.merge_out is not None:
        try:
            with Progress("merge", 3, unit="step") as progress:
                merged = merge_adapter(
                    plan.base_path,
                    plan.out,
                    args.merge_out,
                    device=config.device,
                    trust_remote_code=plan.trust_remote_code,
                    progress=progress,
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
    from server.training.methods import METHODS

    train = sub.add_parser("train", help="train a LoRA adapter by a method: cut, kto, dpo or quark")
    train_sub = train.add_subparsers(dest="method", required=True)
    for name, (text, data_help) in TRAIN_METHODS.items():
        parser = train_sub.add_parser(name, help=text, description=text)
        parser.add_argument("--base", type=Path, required=True, help="base checkpoint folder")
        parser.add_argument("--data", type=Path, required=True, help=data_help)
        parser.add_argument("--out", type=Path, required=True, help="adapter folder to write")
        parser.add_argument(
            "--eval-data",
            type=Path,
            help="held-out data in the same format: the loss and metrics before and "
            "after are measured on it (default: up to 32 training examples)",
        )
        parser.add_argument("--family", help="prompt format (default: as the registry detects it)")
        parser.add_argument("--template", help="a template file replacing the family's")
        parser.add_argument("--base-name", help="the served model name of the base (metadata)")
        parser.add_argument("--init-adapter", type=Path, help="continue training this adapter")
        parser.add_argument(
            "--hyperparameters",
            type=Path,
            help="settings as JSON (the method config's fields); flags override it",
        )
        _add_config_flags(parser, [METHODS[name].config_class()])
        if name == "quark":
            parser.add_argument(
                "--quantile-tokens",
                help="the model's quantile prefixes, best first, comma-separated "
                "(default: the family's _QUANTILE_TOKEN_0_ … _QUANTILE_TOKEN_4_)",
            )
        parser.add_argument(
            "--trust-remote-code",
            action="store_true",
            help="run the checkpoint's own code (as its models-file entry allows)",
        )
        parser.add_argument(
            "--progress-file", type=Path, help="append one JSON line per optimizer step"
        )
        parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        parser.set_defaults(func=_cmd_train)

    merge = sub.add_parser("merge", help="merge a LoRA adapter into its base (a plain checkpoint)")
    merge.add_argument("--base", type=Path, required=True, help="base checkpoint folder")
    merge.add_argument("--adapter", type=Path, required=True, help="LoRA adapter folder")
    merge.add_argument("--out", type=Path, required=True, help="merged checkpoint folder to write")
    merge.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="the merged weights' dtype (auto: the base checkpoint's)",
    )
    merge.add_argument(
        "--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N"
    )
    merge.add_argument(
        "--trust-remote-code", action="store_true", help="run the checkpoint's own model code"
    )
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
    align.add_argument(
        "--method",
        choices=["cut", "kto", "dpo", "quark"],
        help="how to train (default: the model's online.method, else its family's)",
    )
    align.add_argument(
        "--min-examples",
        "--min-judged",
        dest="min_examples",
        type=int,
        help="the fewest usable pieces of the method's feedback to train on (judged "
        "responses, labels, pairs, rewards; default: the method's)",
    )
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
        help="train on every judgment, reviewed or not (poisoning risk: see "
        "docs/operations/security.md)",
    )
    align.add_argument(
        "--admin-key-file",
        type=Path,
        help="a file holding the gateway's admin key (default: ALIGNGATE_ADMIN_KEY; a key is "
        "never a flag value, which the process list shows)",
    )
    _add_config_flags(align, _all_configs(), server_defaults=True)
    align.set_defaults(func=_cmd_align)
