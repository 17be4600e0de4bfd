"""Feedback routes: ``POST/GET /v1/feedback`` and ``GET /v1/completions/{id}``."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from server.errors import InvalidRequest
from server.feedback import service as feedback
from server.protocol import (
    ERROR_RESPONSES,
    FeedbackList,
    FeedbackPublic,
    FeedbackRequest,
    FeedbackSummary,
    StoredCompletion,
)
from server.routes.deps import StoreDep, TenantDep

router = APIRouter(prefix="/v1", responses=ERROR_RESPONSES)


@router.post("/feedback", status_code=201, response_model=FeedbackPublic)
async def post_feedback(body: FeedbackRequest, request: Request, store: StoreDep) -> JSONResponse:
    return await feedback.create_feedback(body, request, store)


@router.get("/feedback")
async def get_feedback(
    store: StoreDep,
    tenant: TenantDep,
    model: str | None = None,
    label: Literal["desirable", "undesirable"] | None = None,
    since: str | None = None,
    after: Annotated[str | None, Query(max_length=512)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    order: Literal["asc", "desc"] = "asc",
) -> FeedbackList:
    try:
        since_at = feedback.parse_since(since)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="since") from exc
    return await feedback.list_feedback(
        store,
        owner=tenant,
        model=model,
        label=label,
        since=since_at,
        after=after,
        limit=limit,
        newest_first=order == "desc",
    )


@router.get("/feedback/summary")
async def get_feedback_summary(store: StoreDep, tenant: TenantDep) -> FeedbackSummary:
    """Counts per model: total, desirable / undesirable / neutral, judgments, preferences."""
    return FeedbackSummary(data=await store.feedback_summary(owner=tenant))


@router.get("/completions/{completion_id}")
async def get_stored_completion(
    completion_id: str, store: StoreDep, tenant: TenantDep
) -> StoredCompletion:
    return await feedback.stored_completion(store, completion_id, tenant)
