"""Feedback on stored completions: taking it in durably, listing it, showing a completion
with its feedback.

Owns: translating between the HTTP models and the store's rows.
Does not know: SQL (``store``), engines.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import Request
from fastapi.responses import JSONResponse

from server.guards.auth import tenant_of
from server.metrics import GatewayMetrics
from server.protocol import (
    FeedbackList,
    FeedbackPublic,
    FeedbackRequest,
    StoredChoice,
    StoredCompletion,
    Usage,
)
from server.store import ANONYMOUS_KEY, HUMAN, FeedbackCreate, FeedbackRow, Store


def public(row: FeedbackRow) -> FeedbackPublic:
    return FeedbackPublic(
        id=row.id,
        created_at=row.created_at,
        completion_id=row.completion_id,
        choice_index=row.choice_index,
        model=row.model,
        judgment=row.judgment,
        rating=row.rating,
        rating_scale=row.rating_scale,
        label=row.label,
        preferred_over=row.preferred_over,
        preferred_over_choice=row.preferred_over_choice,
        annotator=row.annotator,
        key_id=row.key_id,
        reviewed=row.reviewed,
        reward=row.explicit_reward,
    )


async def create_feedback(body: FeedbackRequest, request: Request, store: Store) -> JSONResponse:
    key_id = getattr(request.state, "key_id", None) or ANONYMOUS_KEY
    request.app.state.feedback_limiter.check(key_id)
    row, created = await store.add_feedback(
        FeedbackCreate(
            completion_id=body.completion_id,
            choice_index=body.choice_index,
            judgment=body.judgment,
            rating=body.rating,
            rating_scale=body.rating_scale,
            label=body.label,
            reward=body.reward,
            preferred_over=body.preferred_over,
            preferred_over_choice=body.preferred_over_choice,
            # A display label: the body's, else the name the keys file gives the key.
            annotator=body.annotator or getattr(request.state, "annotator", None),
            idempotency_key=body.idempotency_key,
            key_id=key_id,
            request_id=getattr(request.state, "request_id", None),
        ),
        owner=tenant_of(key_id),
    )
    request.state.model = row.model
    if created:
        metrics: GatewayMetrics = request.app.state.metrics
        metrics.feedback.labels(row.model, HUMAN, row.label or "none").inc()
    # 201 for a new record; 200 for a replay of the same idempotency key.
    return JSONResponse(public(row).model_dump(), status_code=201 if created else 200)


def parse_since(value: str | None) -> float | None:
    """Epoch seconds or an ISO-8601 time."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError as exc:
        raise ValueError(f"since: not a time: {value!r} (epoch seconds or ISO-8601)") from exc


async def list_feedback(
    store: Store,
    *,
    owner: str | None,
    model: str | None,
    label: str | None,
    since: float | None,
    after: str | None,
    limit: int,
    newest_first: bool = False,
) -> FeedbackList:
    rows, cursor = await store.list_feedback(
        model=model,
        label=label,
        since=since,
        after=after,
        limit=limit,
        newest_first=newest_first,
        owner=owner,
    )
    return FeedbackList(
        data=[public(r) for r in rows], has_more=cursor is not None, next_cursor=cursor
    )


async def stored_completion(
    store: Store, completion_id: str, owner: str | None
) -> StoredCompletion:
    record, rows = await store.get_completion(completion_id, owner=owner)
    return StoredCompletion(
        id=record.id,
        created_at=record.created_at,
        endpoint=record.endpoint,
        model=record.model,
        family=record.family,
        template_fingerprint=record.template_fingerprint,
        request=record.request,
        prompt_text=record.prompt_text,
        prompt_token_ids=record.prompt_token_ids,
        sampling=record.sampling,
        choices=[
            StoredChoice(
                index=c.index,
                text=c.text,
                finish_reason=c.finish_reason,
                prompt_text=c.prompt_text,
                token_ids=c.token_ids,
                prompt_token_ids=c.prompt_token_ids,
            )
            for c in record.choices
        ],
        usage=Usage(
            prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens,
            total_tokens=record.prompt_tokens + record.completion_tokens,
        ),
        latency_ms=record.latency_ms,
        status=record.status,
        user=record.user,
        key_id=record.key_id,
        metadata=record.metadata or {},
        request_id=record.request_id,
        feedback=[public(r) for r in rows],
    )
