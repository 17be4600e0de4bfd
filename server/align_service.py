"""The online loop as the server runs it: which base and adapter an iteration on a served
model's traffic starts from, and hot-loading what it trains.

Owns: the mapping from served models to an ``AlignPlan``. Does not know: HTTP.
"""

from __future__ import annotations

import math
from pathlib import Path

from server.errors import Conflict, InvalidRequest
from server.feedback import parse_since
from server.protocol import AlignRequest, CutHyperparameters
from server.registry import Registry
from server.store import Store
from server.training.online import AlignError, AlignJob, AlignJobs, AlignPlan, plan_iteration
from server.training.trainer import CutConfig


def cut_config(h: CutHyperparameters) -> CutConfig:
    values = h.model_dump()
    values["lora_alpha"] = h.lora_alpha or h.lora_r
    return CutConfig(**values)


def plan_for(registry: Registry, model: str, since: float | None) -> AlignPlan:
    served = registry.get(model)
    base = registry.get(served.parent) if served.parent else served
    if not base.engine.lora_enabled:
        raise InvalidRequest(
            f"Model `{base.name}` is served without LoRA support, so a trained adapter could "
            "not be hot-loaded; set `lora:` in its models-file entry.",
            param="model",
        )
    return plan_iteration(
        model=model,
        base_name=base.name,
        base_path=Path(base.path),
        family=base.renderer.family,
        template=base.entry.template,
        adapter_path=Path(served.adapter.path) if served.adapter else None,
        root=registry.adapters_root,
        since=since,
    )


def start_align(body: AlignRequest, registry: Registry, store: Store, jobs: AlignJobs) -> AlignJob:
    try:
        since = parse_since(body.since)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="since") from exc
    if since is not None and not math.isfinite(since):
        raise InvalidRequest("since: not a finite time", param="since")
    plan = plan_for(registry, body.model, since)

    async def load(name: str, path: str) -> None:
        await registry.load_adapter(name, path, base=plan.base_name)

    try:
        return jobs.start(plan, store, cut_config(body.hyperparameters), load, body.min_judged)
    except AlignError as exc:
        raise Conflict(str(exc)) from exc
