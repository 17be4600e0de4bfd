"""OpenAI's Stored Completions API over the store's chat records: retrieve, list, the
request's messages, update metadata, delete.

Owns: rebuilding OpenAI's shapes (``chat.completion``, its messages, cursor pages) from a
``CompletionRecord``; the message ids (``<completion id>-<index>``).
Does not know: SQL (``store``), who the caller is (the route passes the tenant), HTTP.
Text completions (``/v1/completions``) are records too, but not part of this API (OpenAI's
has no such listing); ``GET /v1/completions/{id}`` shows any record in the gateway's own shape.
"""

from __future__ import annotations

from typing import Any

from server.errors import NotFound
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionDeleted,
    StoredChatCompletion,
    StoredChatCompletionList,
    StoredMessage,
    StoredMessageList,
    TextPart,
    Usage,
)
from server.store import CompletionRecord, Store


def chat_completion(record: CompletionRecord) -> StoredChatCompletion:
    return StoredChatCompletion(
        id=record.id,
        created=int(record.created_at),
        model=record.model,
        choices=[
            ChatChoice(
                index=c.index,
                message=AssistantMessage.model_validate(c.message)
                if c.message is not None
                else AssistantMessage(content=c.text),
                finish_reason=c.finish_reason,
            )
            for c in record.choices
        ],
        usage=Usage(
            prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens,
            total_tokens=record.prompt_tokens + record.completion_tokens,
        ),
        metadata=record.metadata or {},
    )


async def retrieve(store: Store, completion_id: str, owner: str | None) -> StoredChatCompletion:
    return chat_completion(await store.get_chat_completion(completion_id, owner=owner))


async def list_completions(
    store: Store,
    *,
    owner: str | None,
    model: str | None,
    metadata: dict[str, str],
    after: str | None,
    limit: int,
    newest_first: bool,
) -> StoredChatCompletionList:
    records, has_more = await store.list_chat_completions(
        owner=owner,
        model=model,
        metadata=metadata,
        after=after,
        limit=limit,
        newest_first=newest_first,
    )
    data = [chat_completion(r) for r in records]
    return StoredChatCompletionList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=has_more,
    )


def stored_message(completion_id: str, index: int, sent: dict[str, Any]) -> StoredMessage:
    content = sent.get("content")
    parts = None
    if isinstance(content, list):
        parts = [TextPart.model_validate(p) for p in content]
        content = "".join(p.text for p in parts)
    return StoredMessage(
        id=f"{completion_id}-{index}",
        role=sent["role"],
        content=content,
        name=sent.get("name"),
        content_parts=parts,
        tool_calls=sent.get("tool_calls"),
        tool_call_id=sent.get("tool_call_id"),
    )


def _message_index(completion_id: str, message_id: str, count: int) -> int:
    prefix, _, index = message_id.rpartition("-")
    if prefix == completion_id and index.isdigit() and int(index) < count:
        return int(index)
    raise NotFound(
        f"No message `{message_id}` in chat completion `{completion_id}`.", param="after"
    )


async def list_messages(
    store: Store,
    completion_id: str,
    *,
    owner: str | None,
    after: str | None,
    limit: int,
    newest_first: bool,
) -> StoredMessageList:
    """The request's messages, in the order sent (or reversed), ``limit`` at a time."""
    record = await store.get_chat_completion(completion_id, owner=owner)
    messages = [stored_message(record.id, i, m) for i, m in enumerate(record.request)]
    if newest_first:
        messages.reverse()
    if after is not None:
        index = _message_index(record.id, after, len(messages))
        position = index if not newest_first else len(messages) - 1 - index
        messages = messages[position + 1 :]
    page = messages[:limit]
    return StoredMessageList(
        data=page,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
        has_more=len(messages) > limit,
    )


async def update_metadata(
    store: Store, completion_id: str, metadata: dict[str, str] | None, owner: str | None
) -> StoredChatCompletion:
    return chat_completion(await store.update_chat_metadata(completion_id, metadata, owner=owner))


async def delete(store: Store, completion_id: str, owner: str | None) -> ChatCompletionDeleted:
    derived = await store.delete_chat_completion(completion_id, owner=owner)
    return ChatCompletionDeleted(id=completion_id, deleted=True, deleted_with_it=derived)
