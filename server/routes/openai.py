"""The OpenAI-compatible routes: chat completions, completions, responses, models."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import Response

from server.models.registry import Registry, ServedModel
from server.protocol import (
    ERROR_RESPONSES,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
    ResponseObject,
    ResponsesRequest,
    Text,
)
from server.routes.deps import RegistryDep, StoreDep, TenantDep
from server.serving.chat import create_chat_completion
from server.serving.completions import create_completion
from server.serving.lenient import ignored_fields, note_ignored
from server.serving.responses import create_response, retrieve_response

router = APIRouter(prefix="/v1", responses=ERROR_RESPONSES)


@router.post("/chat/completions", response_model=ChatCompletion)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, registry: RegistryDep
) -> Response:
    note_ignored(request.scope, ignored_fields(body.model_extra, "/v1/chat/completions"))
    return await create_chat_completion(body, request, registry)


@router.post("/completions", response_model=Completion)
async def completions(body: CompletionRequest, request: Request, registry: RegistryDep) -> Response:
    note_ignored(request.scope, ignored_fields(body.model_extra, "/v1/completions"))
    return await create_completion(body, request, registry)


@router.post("/responses", response_model=ResponseObject)
async def responses(body: ResponsesRequest, request: Request, registry: RegistryDep) -> Response:
    note_ignored(request.scope, ignored_fields(body.model_extra, "/v1/responses"))
    return await create_response(body, request, registry)


@router.get("/responses/{response_id}")
async def retrieve_stored_response(
    response_id: Annotated[Text, Path(max_length=128)], store: StoreDep, tenant: TenantDep
) -> ResponseObject:
    """A stored response (``store``, or the model's `store: true`)."""
    return await retrieve_response(store, response_id, tenant)


def model_card(m: ServedModel) -> ModelCard:
    return ModelCard(
        id=m.name,
        created=m.created,
        root=m.path,
        max_model_len=m.max_model_len,
        family=m.renderer.family,
        template=m.renderer.template_name,
        template_fingerprint=m.renderer.fingerprint,
        sampling_defaults=m.decoding.described(),
        parent=m.parent,
        adapter=m.adapter_meta if m.adapter is not None else None,
    )


def alias_card(alias: str, registry: Registry) -> ModelCard:
    target = registry.get(alias)
    return model_card(target).model_copy(update={"id": alias, "alias_of": target.name})


@router.get("/models")
async def list_models(registry: RegistryDep) -> ModelList:
    cards = [model_card(m) for m in registry.served()]
    cards += [alias_card(alias, registry) for alias, _ in registry.aliases.items()]
    return ModelList(data=cards)


@router.get("/models/{model_id:path}")
async def retrieve_model(model_id: str, registry: RegistryDep) -> ModelCard:
    if registry.aliases.resolve(model_id):
        return alias_card(model_id, registry)
    return model_card(registry.get(model_id))
