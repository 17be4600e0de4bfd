"""OpenAI's Stored Completions routes: ``GET /v1/chat/completions`` (list),
``GET|POST|DELETE /v1/chat/completions/{id}`` and ``GET /v1/chat/completions/{id}/messages``.
Each caller sees its own key's records (the admin key: all)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request

from server.errors import InvalidRequest
from server.protocol import (
    ERROR_RESPONSES,
    ChatCompletionDeleted,
    ChatCompletionUpdate,
    StoredChatCompletion,
    StoredChatCompletionList,
    StoredMessageList,
    Text,
    check_metadata,
)
from server.routes.deps import StoreDep, TenantDep
from server.serving import stored

router = APIRouter(prefix="/v1/chat/completions", responses=ERROR_RESPONSES)

# Ids and filters are text without NUL (PostgreSQL cannot compare one): a 400, not a 503.
CompletionId = Annotated[Text, Path(max_length=128)]
Limit = Annotated[int, Query(ge=1, le=100)]
After = Annotated[Text | None, Query(max_length=128)]


def metadata_filter(request: Request) -> dict[str, str]:
    """``metadata[KEY]=VALUE`` query parameters, as OpenAI's SDK sends a metadata filter."""
    pairs = {
        name[len("metadata[") : -1]: value
        for name, value in request.query_params.multi_items()
        if name.startswith("metadata[") and name.endswith("]")
    }
    try:
        return check_metadata(pairs)  # a filter within the limits a stored pair obeys
    except ValueError as exc:
        raise InvalidRequest(f"metadata: {exc}", param="metadata") from exc


@router.get("")
async def list_chat_completions(
    request: Request,
    store: StoreDep,
    tenant: TenantDep,
    model: Annotated[Text | None, Query(max_length=256)] = None,
    after: After = None,
    limit: Limit = 20,
    order: Literal["asc", "desc"] = "asc",
) -> StoredChatCompletionList:
    return await stored.list_completions(
        store,
        owner=tenant,
        model=model,
        metadata=metadata_filter(request),
        after=after,
        limit=limit,
        newest_first=order == "desc",
    )


@router.get("/{completion_id}")
async def retrieve_chat_completion(
    completion_id: CompletionId, store: StoreDep, tenant: TenantDep
) -> StoredChatCompletion:
    return await stored.retrieve(store, completion_id, tenant)


@router.get("/{completion_id}/messages")
async def list_chat_completion_messages(
    completion_id: CompletionId,
    store: StoreDep,
    tenant: TenantDep,
    after: After = None,
    limit: Limit = 20,
    order: Literal["asc", "desc"] = "asc",
) -> StoredMessageList:
    return await stored.list_messages(
        store, completion_id, owner=tenant, after=after, limit=limit, newest_first=order == "desc"
    )


@router.post("/{completion_id}")
async def update_chat_completion(
    completion_id: CompletionId, body: ChatCompletionUpdate, store: StoreDep, tenant: TenantDep
) -> StoredChatCompletion:
    return await stored.update_metadata(store, completion_id, body.metadata, tenant)


@router.delete("/{completion_id}")
async def delete_chat_completion(
    completion_id: CompletionId, store: StoreDep, tenant: TenantDep
) -> ChatCompletionDeleted:
    return await stored.delete(store, completion_id, tenant)
