"""``POST /tokenize`` and ``POST /detokenize`` as ``vllm serve`` answers them, per model.

``/tokenize`` gives the token ids the gateway would send the engine: a ``prompt`` as
``/v1/completions`` renders it (BOS as the family adds it; Quark's quantile prefix), or
``messages`` through the family's template as ``/v1/chat/completions`` renders them (with
vLLM's ``chat_template_kwargs``, ``add_generation_prompt`` and ``continue_final_message``).
The fields of vLLM's request that the gateway cannot honour are refused by name (400),
never ignored: a different tokenization would go unnoticed. ``/detokenize`` is the tokenizer's
plain ``decode``, as vLLM's.

Rate-limited per key like ``/v1/render`` (a request each; no tokens generated). Owns the
two routes; does not know templates (``models.render``) or how a prompt is generated.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.errors import InvalidRequest
from server.models.registry import Registry, ServedModel
from server.models.render import RenderError
from server.protocol import (
    ERROR_RESPONSES,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from server.routes.deps import RegistryDep
from server.serving.chat import to_messages
from server.serving.generation import check_request_rate
from server.serving.tokenizing import off_loop, text_size

router = APIRouter(responses=ERROR_RESPONSES)


def _model(registry: Registry, name: str | None, request: Request) -> ServedModel:
    """``model`` as named; omitted, the one model served (vLLM's default model)."""
    if name is None:
        served = registry.all()
        if len(served) != 1:
            names = ", ".join(m.name for m in served)
            raise InvalidRequest(
                f"`model` is required: this gateway serves {len(served)} models ({names}).",
                param="model",
            )
        name = served[0].name
    model = registry.get(name)
    request.state.model = model.name
    check_request_rate(request, model)
    return model


def _refuse_unsupported(body: TokenizeRequest) -> None:
    """vLLM's fields that would change the token ids in ways this gateway cannot render."""
    if body.messages is None:
        chat_only = {
            "add_generation_prompt": not body.add_generation_prompt,
            "continue_final_message": body.continue_final_message,
            "chat_template": body.chat_template is not None,
            "chat_template_kwargs": body.chat_template_kwargs is not None,
            "tools": body.tools is not None,
        }
        for field, sent in chat_only.items():
            if sent:
                raise InvalidRequest(f"`{field}` applies to `messages` only.", param=field)
        return
    if body.continue_final_message and body.add_generation_prompt:
        raise InvalidRequest(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to true.",
            param="add_generation_prompt",
        )
    refusals = {
        "add_special_tokens": (
            bool(body.add_special_tokens),
            "the family's template places the special tokens; none are added on top",
        ),
        "chat_template": (
            body.chat_template is not None,
            "a model's template is fixed by its family (the models file's `template`)",
        ),
    }
    for field, (sent, why) in refusals.items():
        if sent:
            raise InvalidRequest(f"`{field}` is not supported: {why}.", param=field)


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(
    body: TokenizeRequest, request: Request, registry: RegistryDep
) -> TokenizeResponse:
    if (body.messages is None) == (body.prompt is None):
        raise InvalidRequest("Send either `prompt` or `messages`.", param="prompt")
    _refuse_unsupported(body)
    model = _model(registry, body.model, request)
    renderer = model.renderer
    try:
        if body.messages is not None:
            size = text_size(body.model_dump(include={"messages", "tools"}))
            messages = to_messages(body.messages)
            tools = [t.model_dump(exclude_none=True) for t in body.tools or []] or None
            chat = await off_loop(
                size,
                renderer.render_chat,
                messages,
                quantile=body.quantile,
                template_kwargs=body.chat_template_kwargs,
                generation_prompt=body.add_generation_prompt,
                continue_final=body.continue_final_message,
                tools=tools,
            )
            ids = chat.token_ids
        elif body.add_special_tokens is False:
            if body.quantile is not None:
                raise InvalidRequest(
                    "`quantile` is a special token: it needs `add_special_tokens`.",
                    param="quantile",
                )
            prompt = body.prompt or ""
            ids = await off_loop(len(prompt), renderer.encode_raw, prompt)
        else:
            prompt = body.prompt or ""
            rendered = await off_loop(
                len(prompt), renderer.render_text, prompt, quantile=body.quantile
            )
            ids = rendered.token_ids
    except RenderError as exc:
        raise InvalidRequest(str(exc), param=exc.param) from exc
    strs = renderer.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return TokenizeResponse(
        count=len(ids), max_model_len=model.max_model_len, tokens=ids, token_strs=strs
    )


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(
    body: DetokenizeRequest, request: Request, registry: RegistryDep
) -> DetokenizeResponse:
    model = _model(registry, body.model, request)
    try:
        rendered = model.renderer.render_ids(body.tokens)
    except RenderError as exc:
        raise InvalidRequest(str(exc), param="tokens") from exc
    return DetokenizeResponse(prompt=rendered.text)
