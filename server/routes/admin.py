"""Admin routes: serve and unload LoRA adapters, run online-alignment iterations, export
the collected feedback."""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from server.errors import InvalidRequest, ModelNotFound, NotFound
from server.feedback.export import build_export
from server.feedback.service import parse_since
from server.protocol import (
    ERROR_RESPONSES,
    AdapterLoadRequest,
    AlignRequest,
    ModelCard,
    PromoteRequest,
    ReviewRequest,
)
from server.routes.deps import AlignJobsDep, RegistryDep, StoreDep
from server.routes.openai import model_card
from server.settings import Settings
from server.store import ANONYMOUS_KEY
from server.training.service import holdout_of, start_align

# Guarded by server.guards.auth.AuthMiddleware: the admin key, or loopback while none is set.
router = APIRouter(prefix="/admin", responses=ERROR_RESPONSES)


@router.post("/adapters", status_code=201, response_model=ModelCard)
async def load_adapter(body: AdapterLoadRequest, registry: RegistryDep) -> JSONResponse:
    served = await registry.load_adapter(body.name, body.path or body.name, base=body.base)
    return JSONResponse(model_card(served).model_dump(), status_code=201)


@router.delete("/adapters/{name:path}")
async def unload_adapter(name: str, registry: RegistryDep) -> dict[str, object]:
    await registry.unload_adapter(name)
    return {"id": name, "object": "model", "deleted": True}


@router.post("/align", status_code=202)
async def start_align_job(
    body: AlignRequest, request: Request, registry: RegistryDep, store: StoreDep, jobs: AlignJobsDep
) -> JSONResponse:
    """Start one online iteration in the background; poll ``GET /admin/align/{job}``."""
    job = start_align(
        body,
        registry,
        store,
        jobs,
        request.app.state.settings,
        judges=request.app.state.judges,
        metrics=request.app.state.metrics,
        key_id=getattr(request.state, "key_id", None) or ANONYMOUS_KEY,
    )
    return JSONResponse(job.public(), status_code=202)


@router.get("/align/{job_id}")
async def align_job_status(job_id: str, jobs: AlignJobsDep) -> dict[str, object]:
    job = jobs.get(job_id)
    if job is None:
        raise NotFound(f"No align job `{job_id}`.", param="job_id")
    return job.public()


@router.post("/promote")
async def promote(
    body: PromoteRequest, registry: RegistryDep, request: Request
) -> dict[str, object]:
    """Point ``NAME@latest`` at a version of ``NAME`` by hand: promote, or roll back."""
    previous = await registry.promote(body.alias, body.version, by="admin", reason=body.reason)
    request.app.state.metrics.promoted(body.alias, body.version, previous)
    return {
        "object": "promotion",
        "alias": body.alias,
        "version": body.version,
        "previous": previous,
        "history": [p.public() for p in registry.aliases.history(body.alias)],
    }


@router.get("/whoami")
async def whoami() -> dict[str, bool]:
    """200 for a client the admin routes accept (the web UI shows admin actions then)."""
    return {"admin": True}


@router.post("/feedback/review")
async def review_feedback(body: ReviewRequest, store: StoreDep) -> dict[str, object]:
    """Mark feedback reviewed: the online loop trains on reviewed judgments by default."""
    updated = await store.set_reviewed(body.ids, body.reviewed)
    return {"object": "feedback.review", "updated": updated, "reviewed": body.reviewed}


@router.get("/export")
async def export_feedback(
    request: Request,
    store: StoreDep,
    registry: RegistryDep,
    format: Literal["cut", "kto", "trl-kto", "dpo", "quark"],
    model: str | None = None,
    since: str | None = None,
    annotator: Annotated[list[str] | None, Query()] = None,
    key_id: Annotated[list[str] | None, Query()] = None,
    reviewed_only: bool = False,
) -> Response:
    """``aligngate export`` over HTTP: the training file, as a download."""
    try:
        since_at = parse_since(since)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="since") from exc
    if since_at is not None and not math.isfinite(since_at):
        raise InvalidRequest("since: not a finite time", param="since")
    rows, records = await asyncio.to_thread(
        store.export_rows,
        model=model,
        since=since_at,
        annotators=annotator,
        key_ids=key_id,
        trusted=[] if reviewed_only else None,
    )
    settings: Settings = request.app.state.settings
    shares = {m.name: holdout_of(m.entry, settings) for m in registry.all()}
    # A model no longer served (or an adapter's base unknown): the largest share, so
    # nothing held out leaves.
    widest = max([settings.holdout, *shares.values()])

    def holdout(model_name: str) -> float:
        try:
            served = registry.get(model_name)
        except ModelNotFound:
            return widest
        return shares.get(served.parent or served.name, widest)

    items, report = build_export(format, rows, records, holdout)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", f"aligngate-{format}{'-' + model if model else ''}")
    return Response(
        json.dumps(items, ensure_ascii=False, indent=2),
        media_type="application/json",
        headers={
            "content-disposition": f'attachment; filename="{name}.json"',
            # How many verdicts a later one on the same choice replaced, and how many disagreed.
            "x-aligngate-export-superseded": str(report.superseded),
            "x-aligngate-export-conflicts": str(report.conflicts),
            # Feedback on the held-out share of traffic (kept for evaluation, never exported).
            "x-aligngate-export-held-out": str(report.held_out),
            # Feedback on conversations with tools (the formats hold text turns only).
            "x-aligngate-export-with-tools": str(report.with_tools),
        },
    )
