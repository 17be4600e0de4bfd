"""``aligngate check``: validate a models file and print its resource plan, starting no
engine. Exit status 0: the plan holds; 1: over-committed; 2: the file is invalid.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from server.settings import Settings

log = logging.getLogger("aligngate")


def add_check_command(sub: Any) -> None:
    check = sub.add_parser(
        "check", help="validate a models file and print its resource plan (starts no engine)"
    )
    check.add_argument("--config", type=Path, help="models file; default: embedded model")
    check.add_argument(
        "--gpu-memory-gib",
        type=float,
        help="plan for CUDA GPUs of this size (on a machine without them)",
    )
    check.add_argument("--gpus", type=int, default=1, help="with --gpu-memory-gib: how many")
    check.add_argument("--json", action="store_true", help="print the plan as JSON")
    check.add_argument(
        "--sizing",
        action="store_true",
        help="print the GPU deployments page's sizing table (the four families' reference "
        "checkpoints)",
    )
    check.set_defaults(func=_cmd_check)


def plan_as_dict(plan: Any) -> dict[str, Any]:
    return {
        "ok": plan.ok,
        "platform": dataclasses.asdict(plan.platform),
        "usable_fraction": plan.usable_fraction,
        "engines": [dataclasses.asdict(e) for e in plan.engines],
        "training": dataclasses.asdict(plan.training) if plan.training else None,
        "start_groups": plan.start_groups,
        "problems": plan.problems,
        "notes": plan.notes,
    }


def plan_table(plan: Any) -> str:
    """The plan as a Markdown table, the way the GPU deployments page shows it."""
    on_cuda = plan.platform.on_cuda
    head = (
        "| model | devices | share | weights | KV cache | KV tokens | LoRA slots |",
        "|---|---|---|---|---|---|---|",
    )
    rows = []
    for e in plan.engines:
        if on_cuda:
            devices = ",".join(f"cuda:{d}" for d in e.devices)
            given = " (given)" if e.explicit else ""
            share = f"{e.share_gib:.1f} GiB = {e.gpu_memory_utilization:.4f}{given}"
        else:
            devices, share = "cpu", f"~{e.share_gib:.1f} GiB RAM"
        lora = f"{e.lora_slots} ({e.lora_gib * 1024:.0f} MiB)" if e.lora_slots else "off"
        rows.append(
            f"| {e.name} | {devices} | {share} | {e.weights_gib:.2f} GiB | "
            f"{e.kv_cache_gib:.2f} GiB | {e.kv_tokens:,} | {lora} |"
        )
    return "\n".join([*head, *rows])


def render_plan(plan: Any) -> str:
    platform = plan.platform
    if platform.on_cuda:
        gpus = ", ".join(f"cuda:{g.index} {g.total_gib:.0f} GiB" for g in platform.gpus)
        assumed = " (assumed)" if platform.assumed else ""
        lines = [f"platform: CUDA{assumed}: {gpus}; usable {plan.usable_fraction:.2f} of each"]
    else:
        lines = [f"platform: CPU, {platform.ram_gib:.1f} GiB RAM"]
    lines += ["", plan_table(plan), ""]
    t = plan.training
    if t is None:
        lines.append("training: none (no model is served with LoRA)")
    elif t.device == "cpu":
        lines.append(
            f"training: cpu, needs ~{t.needed_gib:.1f} GiB RAM for {t.model} ({t.breakdown})"
        )
    else:
        verdict = "fits" if t.fits else "does NOT fit"
        lines.append(
            f"training: {t.device}, reserve {t.reserve_gib:.1f} GiB; {t.model}'s CUT run "
            f"needs ~{t.needed_gib:.1f} GiB ({t.breakdown}): {verdict}"
        )
    if platform.on_cuda and plan.start_groups:
        lines.append("start order: " + " → ".join("+".join(g) for g in plan.start_groups))
    lines += [f"note: {n}" for n in plan.notes]
    lines += [f"PROBLEM: {p}" for p in plan.problems]
    lines.append("estimates: weights from safetensors headers, KV cache and overhead computed")
    return "\n".join(lines)


def _cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    from server.models.models_file import ModelsFileError, default_deployment, load_deployment
    from server.models.planning import PlanningError, plan_deployment
    from server.resources.platform import PlatformError, assumed_gpus, detect

    if args.sizing:
        from server.resources.reference import sizing_markdown

        print(sizing_markdown())
        return 0
    try:
        config = args.config or settings.config
        deployment = load_deployment(config) if config else default_deployment()
        platform = (
            assumed_gpus(args.gpu_memory_gib, args.gpus)
            if args.gpu_memory_gib is not None
            else detect()
        )
        if deployment.cluster is not None:
            from server.cluster.config import shared_store_problem

            problem = shared_store_problem(settings.store_url())
            if problem is not None:
                raise ModelsFileError(problem)
        plan = plan_deployment(deployment.models, deployment.resources, settings, platform)
    except (ModelsFileError, PlanningError, PlatformError) as exc:
        log.error("%s", exc)
        return 2
    if args.json:
        json.dump(plan_as_dict(plan), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(render_plan(plan))
    return 0 if plan.ok else 1
