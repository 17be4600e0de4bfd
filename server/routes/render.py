"""``POST /v1/render``: the exact prompt text and token ids a model would receive.

Rate-limited per key like the generating routes (requests per minute; it generates no
tokens), and rendered off the event loop (``serving.tokenizing``).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.errors import InvalidRequest
from server.models.render import RenderError
from server.protocol import ERROR_RESPONSES, RenderRequest, RenderResponse
from server.routes.deps import RegistryDep
from server.serving.chat import to_messages
from server.serving.generation import check_request_rate, template_headers
from server.serving.tokenizing import off_loop, text_size

router = APIRouter(prefix="/v1", responses=ERROR_RESPONSES)


@router.post("/render", response_model=RenderResponse)
async def render(body: RenderRequest, request: Request, registry: RegistryDep) -> JSONResponse:
    model = registry.get(body.model)
    request.state.model = model.name
    if (body.messages is None) == (body.prompt is None):
        raise InvalidRequest("Send either `messages` or `prompt`.", param="messages")
    if body.tools and body.messages is None:
        raise InvalidRequest("`tools` go with `messages`.", param="tools")
    check_request_rate(request, model)  # a render counts as a request (rpm)
    renderer = model.renderer
    try:
        if body.messages is not None:
            messages = to_messages(body.messages)
            size = text_size(body.model_dump(include={"messages", "tools"}))
            tools = [t.model_dump(exclude_none=True) for t in body.tools or []] or None
            prompt = await off_loop(
                size, renderer.render_chat, messages, quantile=body.quantile, tools=tools
            )
        else:
            text = body.prompt or ""
            prompt = await off_loop(len(text), renderer.render_text, text, quantile=body.quantile)
    except RenderError as exc:
        raise InvalidRequest(str(exc), param=exc.param) from exc
    result = RenderResponse(
        model=model.name,
        family=renderer.family,
        template=renderer.template_name,
        template_fingerprint=renderer.fingerprint,
        text=prompt.text,
        token_ids=prompt.token_ids,
        tokens=renderer.tokenizer.convert_ids_to_tokens(prompt.token_ids),
        stop=list(renderer.stop),
    )
    return JSONResponse(result.model_dump(), headers=template_headers(model))
