"""The online loop as the server runs it (and as ``aligngate align --config`` runs it without
one): which base and adapter an iteration on a model's traffic starts from, and hot-loading
what it trains.

Owns: the mapping from served models to an ``AlignPlan``. Does not know: HTTP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from pathlib import Path

from server.errors import Conflict, InvalidRequest
from server.evaluation.batch import Item
from server.evaluation.gate import GATE_FILE, GateSettings, run_gate
from server.evaluation.gate_rule import GateRule
from server.evaluation.judges import Judge, compare
from server.feedback.export import instruction_of
from server.feedback.service import parse_since
from server.guards.auth import parse_keys, trusted_key_ids
from server.metrics import GatewayMetrics
from server.models.adapter_files import AdapterFileError, inspect_adapter, resolve_adapter
from server.models.adapter_meta import write_json_atomic
from server.models.aliases import latest_alias
from server.models.models_file import (
    SELF_URL,
    ModelEntry,
    ModelsFileError,
    build_renderer,
    resolve_path,
)
from server.models.registry import Registry
from server.protocol import AlignRequest, GateRequest, Hyperparameters
from server.resources.plan import Plan
from server.resources.platform import GIB
from server.settings import Settings
from server.store import ANONYMOUS_KEY, BattleCreate, Store, judge_source
from server.training.arguments import C, TrainingArgs, placed
from server.training.loop import memory_needed
from server.training.methods import method as method_named
from server.training.online import (
    AlignError,
    AlignJob,
    AlignJobs,
    AlignPlan,
    Gate,
    TrainingRun,
    TrainingRunner,
    plan_iteration,
    run_here,
)


def method_config(method: str, h: Hyperparameters) -> TrainingArgs:
    """The method's config: its defaults (the same as ``aligngate train``'s), then the
    settings the request gave. A setting of another method is a 400 naming it."""
    config_class = method_named(method).config_class()
    given = h.given()
    known = {f.name for f in dataclasses.fields(config_class)}
    foreign = sorted(set(given) - known)
    if foreign:
        raise InvalidRequest(
            f"{', '.join(foreign)}: not a setting of {method} (this iteration's method)",
            param="hyperparameters",
        )
    return config_class.from_dict(given)


def holdout_of(entry: ModelEntry, settings: Settings) -> float:
    """The entry's ``online.holdout``, else ALIGNGATE_HOLDOUT."""
    return entry.online.holdout if entry.online.holdout is not None else settings.holdout


def method_of(entry: ModelEntry, family: str | None) -> str:
    """The models file's ``online.method``, else the family's ``training_method``."""
    from server.models.families import family as family_spec

    if entry.online.method is not None:
        return entry.online.method
    return family_spec(family).training_method if family else "cut"


def placed_by_plan(config: C, resources: Plan | None, base: Path) -> C:
    """The server's iterations train where its resource plan says (the training GPU, or
    the CPU), with its gradient-checkpointing setting; on a GPU an iteration whose estimate
    exceeds the reserve is refused before it starts, with the numbers."""
    if resources is None or resources.training is None:
        return config
    training = resources.training
    config = placed(
        dataclasses.replace(
            config,
            device=training.device,
            gradient_checkpointing=training.gradient_checkpointing,
        ),
        resources.platform,
    )
    if training.device != "cpu":
        needed = memory_needed(base, config)
        if needed.total / GIB > training.reserve_gib:
            raise InvalidRequest(
                f"This iteration needs ~{needed.total / GIB:.1f} GiB on {training.device} "
                f"({needed.describe()}), more than the training reserve of "
                f"{training.reserve_gib:.1f} GiB; lower `cutoff` or raise "
                "`resources.training.reserve_gib` in the models file.",
                param="hyperparameters",
            )
    return config


def trusted_for(
    settings: Settings, key_ids: list[str], include_unreviewed: bool
) -> tuple[str, ...] | None:
    """Whose judgments train unreviewed, by API key id: ``ALIGNGATE_TRUSTED_ANNOTATORS``,
    the keys file's ``trusted`` keys and ``key_ids`` (None: everyone's). Never the
    ``annotator`` label, which any key holder sets."""
    if include_unreviewed:
        return None
    return tuple(
        dict.fromkeys([*settings.trusted_annotator_list(), *trusted_keys(settings), *key_ids])
    )


def trusted_keys(settings: Settings) -> list[str]:
    """The keys file's ``trusted`` keys (the file is the trust, so it is read again here:
    ``align --config`` runs without a server)."""
    return trusted_key_ids(parse_keys(settings.inline_api_keys(), settings.api_keys_file))


def plan_for(
    registry: Registry,
    model: str,
    since: float | None,
    trusted: tuple[str, ...] | None = (),
    method: str | None = None,
    holdout: float | None = None,
) -> AlignPlan:
    """``holdout``: the share of traffic kept from training (None: the entry's)."""
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
        trusted=trusted,
        trust_remote_code=base.entry.trust_remote_code,
        method=method or method_of(base.entry, base.renderer.family),
        quantile_tokens=_entry_tokens(base.entry),
        holdout=(
            holdout
            if holdout is not None
            else base.entry.online.holdout
            if base.entry.online.holdout is not None
            else 0.0
        ),
    )


def _entry_tokens(entry: ModelEntry) -> tuple[str, ...] | None:
    return tuple(entry.quantile_tokens) if entry.quantile_tokens else None


def gate_judge(request: GateRequest, judges: dict[str, Judge]) -> Judge | None:
    """The pairwise judge the gate asks: the one named, else the models file's only one."""
    pairwise = {name: j for name, j in judges.items() if j.kind == "pairwise"}
    if request.judge is not None:
        if request.judge not in pairwise:
            raise InvalidRequest(
                f"No pairwise judge `{request.judge}` in the models file "
                f"(pairwise judges: {', '.join(sorted(pairwise)) or 'none'}).",
                param="gate.judge",
            )
        return pairwise[request.judge]
    if len(pairwise) > 1:
        raise InvalidRequest(
            f"Name the gate's judge: the models file has {len(pairwise)} pairwise judges.",
            param="gate.judge",
        )
    return next(iter(pairwise.values()), None)


def refuse_self_judging(judge: Judge, base: str, registry: Registry, settings: Settings) -> None:
    """A 400 when the gate's judge is this gateway serving ``base`` or one of its versions
    (the candidate and the incumbent both run on ``base``)."""
    from urllib.parse import urlsplit

    here = judge.entry.url == SELF_URL
    if not here and judge.url:
        parts = urlsplit(judge.url)
        local = {"127.0.0.1", "localhost", "::1", settings.host}
        here = parts.hostname in local and parts.port == settings.port
    if not here or judge.entry.model is None:
        return
    try:
        served = registry.get(judge.entry.model)
    except Exception:  # not a model of this gateway: another server on this port's host
        return
    if (served.parent or served.name) == base:
        raise InvalidRequest(
            f"The gate's judge `{judge.name}` is this gateway's `{judge.entry.model}`, served "
            f"from `{base}` like the candidate and the incumbent: a model would judge its own "
            "answers. Use another judge, or set gate.allow_self_judging: true.",
            param="gate.judge",
        )


async def gate_instructions(
    request: GateRequest,
    base: str,
    registry: Registry,
    store: Store,
    explicit: Path | None,
    fallback: Path | None,
    rule: GateRule,
    holdout: float,
) -> GateSettings:
    """The gate's instructions: the request's file; else the base's held-out traffic (its
    own versions' too) when it holds ``size`` distinct prompts; else ALIGNGATE_GATE_
    INSTRUCTIONS; else an AlpacaEval slice, with a warning that it overlaps the benchmark."""
    common = {"size": request.size, "max_tokens": request.max_tokens, "rule": rule}
    if explicit is not None:
        return GateSettings(**common, eval_file=explicit, eval_source=str(explicit))
    warnings = []
    if holdout > 0:
        versions = [base, *(a.name for a in registry.adapters() if a.parent == base)]
        records = await store.held_out_completions(
            models=versions, share=holdout, limit=20 * request.size
        )
        prompts = list(dict.fromkeys(instruction_of(r) for r in records))
        if len(prompts) >= request.size:
            items = [Item(i, text, None) for i, text in enumerate(prompts[: request.size])]
            return GateSettings(**common, items=items, eval_source="held-out traffic")
        warnings.append(
            f"only {len(prompts)} held-out prompts of `{base}` (the gate asks {request.size})"
        )
    if fallback is not None:
        return GateSettings(
            **common, eval_file=fallback, eval_source=str(fallback), warnings=tuple(warnings)
        )
    warnings.append(
        "AlpacaEval instructions: the gate's set overlaps the benchmark you report; set "
        "online.holdout, gate.instructions or ALIGNGATE_GATE_INSTRUCTIONS"
    )
    return GateSettings(**common, eval_source="alpaca_eval", warnings=tuple(warnings))


def make_gate(
    request: GateRequest,
    base: str,
    registry: Registry,
    store: Store,
    judges: dict[str, Judge],
    settings: Settings,
    metrics: GatewayMetrics | None,
    owner: str = ANONYMOUS_KEY,
) -> Gate | None:
    """The promotion gate an iteration runs after hot-loading its adapter (None: off).
    ``owner``: the key that started the iteration; its leaderboard shows the gate's battles."""
    if not request.enabled:
        return None
    judge = gate_judge(request, judges)
    if judge is not None and not request.allow_self_judging:
        refuse_self_judging(judge, base, registry, settings)
    explicit = Path(request.instructions) if request.instructions else None
    if explicit is not None and not explicit.is_file():
        raise InvalidRequest(f"{explicit} is not a file.", param="gate.instructions")
    fallback = settings.gate_instructions
    if explicit is None and fallback is not None and not fallback.is_file():
        raise InvalidRequest(f"{fallback} is not a file.", param="gate.instructions")
    rule = GateRule(
        mode=request.mode, margin=request.margin, length_controlled=request.length_controlled
    )
    holdout = holdout_of(registry.get(base).entry, settings)
    alias = latest_alias(base)

    async def gate(candidate_name: str) -> dict[str, object]:
        if judge is None:
            return {
                "promoted": False,
                "reason": "no pairwise judge in the models file (judges: … kind: pairwise): "
                f"`{candidate_name}` is served under its own name; promote it by hand with "
                "POST /admin/promote",
            }
        candidate, incumbent = registry.get(candidate_name), registry.get(alias)
        try:
            gate_settings = await gate_instructions(
                request, base, registry, store, explicit, fallback, rule, holdout
            )
            report = await run_gate(
                candidate,
                incumbent,
                judge.name,
                lambda conversation, a, b: compare(judge, conversation, a, b),
                gate_settings,
            )
        except Exception as exc:  # the eval set, an engine, the judge: reported, never promoted
            return {"promoted": False, "reason": f"the gate could not run: {exc}"}
        for battle in report.battles:
            await store.record_battle(
                BattleCreate(
                    model_a=candidate.name,
                    model_b=incumbent.name,
                    key_id=owner,
                    source=judge_source(judge.name),
                    messages=battle["messages"],
                    winner=battle["winner"],
                    annotator=judge.entry.annotator,
                )
            )
        if metrics is not None:
            metrics.gate_win_rate.labels(base).set(report.win_rate)
        if report.promoted and request.promote:
            previous = await registry.promote(
                alias, candidate.name, by="gate", reason=report.reason
            )
            if metrics is not None:
                metrics.promoted(alias, candidate.name, previous)
        elif report.promoted:
            report.promoted = False
            report.reason += (
                f"; not promoted (promote: false): `{alias}` still serves {incumbent.name}"
            )
        else:
            report.reason += f"; `{alias}` still serves {incumbent.name}"
        if candidate.adapter is not None:
            # The audit trail beside the adapter: the report with every answer and verdict.
            await asyncio.to_thread(
                write_json_atomic,
                Path(candidate.adapter.path) / GATE_FILE,
                report.public(outputs=True),
            )
        return report.public()

    return gate


def start_align(
    body: AlignRequest,
    registry: Registry,
    store: Store,
    jobs: AlignJobs,
    settings: Settings,
    judges: dict[str, Judge] | None = None,
    metrics: GatewayMetrics | None = None,
    key_id: str = ANONYMOUS_KEY,
) -> AlignJob:
    try:
        since = parse_since(body.since)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="since") from exc
    if since is not None and not math.isfinite(since):
        raise InvalidRequest("since: not a finite time", param="since")
    trusted = trusted_for(settings, body.trusted_annotators, body.include_unreviewed)
    served = registry.get(body.model)
    base_name = served.parent or served.name
    busy = jobs.running()
    if busy is not None:
        raise Conflict(f"align job {busy.id} is still {busy.status}")
    # Held from planning (which picks the iteration and its feedback window) until the
    # job ends: a second front end on the same store cannot train the same window.
    lock = store.try_lock(f"align:{base_name}")
    if lock is None:
        raise Conflict(
            f"An online iteration of `{base_name}` is running on another front end of "
            "this store; try again when it has finished."
        )
    try:
        base_entry = registry.get(base_name).entry
        plan = plan_for(
            registry, body.model, since, trusted, body.method, holdout_of(base_entry, settings)
        )

        async def load(name: str, path: str) -> None:
            await registry.load_adapter(name, path, base=plan.base_name)

        config = placed_by_plan(
            method_config(plan.method, body.hyperparameters), registry.plan, plan.base_path
        )
        gate = make_gate(
            body.gate, plan.base_name, registry, store, judges or {}, settings, metrics, key_id
        )
        return jobs.start(
            plan,
            store,
            config,
            load,
            body.min_examples or body.min_judged,
            gate,
            lock,
            training_runner(registry),
        )
    except AlignError as exc:
        lock.release()
        raise Conflict(str(exc)) from exc
    except BaseException:
        lock.release()
        raise


def training_runner(registry: Registry) -> TrainingRunner:
    """Where the iteration's worker runs: a child process of this gateway, or on a Ray
    cluster a Ray task with the resources the models file's ``cluster.training`` asks for
    (the device is then decided on that node, as its replicas' engines are)."""
    if registry.cluster is None:
        return run_here
    from server.cluster.training import run_as_task

    task = registry.cluster.settings.training

    async def run_on_cluster(cmd: list[str], env: dict[str, str], log_path: Path) -> TrainingRun:
        return TrainingRun(*await run_as_task(task, cmd, env, log_path))

    return run_on_cluster


def plan_offline(
    entries: list[ModelEntry],
    settings: Settings,
    model: str,
    since: float | None,
    trusted: tuple[str, ...] | None = (),
    method: str | None = None,
) -> AlignPlan:
    """The plan for ``aligngate align --config FILE``, without a running server: ``model``
    is a models-file entry, one of its listed adapters, or an earlier iteration's folder
    under the adapters root (its metadata names the base)."""
    root = settings.adapters_dir.resolve()
    by_name = {e.name: e for e in entries}
    entry, adapter = by_name.get(model), None
    if entry is None:
        listed = [(e, a) for e in entries for a in e.adapters if a.name == model]
        if listed:
            entry, adapter = listed[0][0], resolve_adapter(root, listed[0][1].path)
        else:
            try:
                folder = inspect_adapter(resolve_adapter(root, model))
            except AdapterFileError as exc:
                raise ModelsFileError(
                    f"`{model}` is neither a model of the models file nor an adapter folder "
                    f"under {root} ({exc})"
                ) from exc
            base = ((folder.meta or {}).get("base_model") or {}).get("name")
            if base not in by_name:
                raise ModelsFileError(
                    f"adapter `{model}` was trained on `{base}`, which the models file "
                    "does not serve"
                )
            entry, adapter = by_name[base], folder.path
    path = resolve_path(entry, settings)
    renderer = build_renderer(entry, path)
    return plan_iteration(
        model=model,
        base_name=entry.name,
        base_path=Path(path),
        family=renderer.family,
        template=entry.template,
        adapter_path=adapter,
        root=root,
        since=since,
        trusted=trusted,
        trust_remote_code=entry.trust_remote_code,
        method=method or method_of(entry, renderer.family),
        quantile_tokens=_entry_tokens(entry),
        holdout=holdout_of(entry, settings),
    )
