"""Writes docs/coming-from-vllm.md: every field of vLLM's chat and text completion
requests, and every `vllm serve` server flag and engine argument, with what the gateway
does with it — read from
the installed vLLM and from the gateway's own code (the request models, the lenient rule,
the models file), so the page cannot drift from either. tests/test_docs_vllm.py checks the
committed page is what this writes.

    .venv/bin/python docs/gen_coming_from_vllm.py
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

PAGE = Path(__file__).with_name("coming-from-vllm.md")

# vLLM's OpenAI server routes (vllm.entrypoints.openai / serve routers) and the gateway's.
ENDPOINTS = [
    ("POST /v1/chat/completions", "served (fields below)"),
    ("POST /v1/completions", "served (fields below)"),
    ("POST /v1/responses, GET /v1/responses/{id}", "served: text in, text out, no tools"),
    ("GET /v1/models", "served, plus family, template, sampling defaults, adapters"),
    ("POST /tokenize, POST /detokenize", "served, per model"),
    ("GET /health", "served (503 while a model cannot serve)"),
    ("GET /metrics", "served: vLLM's `vllm:*` series beside `aligngate_*`"),
    ("POST /v1/load_lora_adapter", "`POST /admin/adapters` (admin key)"),
    ("POST /v1/unload_lora_adapter", "`DELETE /admin/adapters/{name}` (admin key)"),
    ("GET /version", "not served; `aligngate --version` prints the gateway's and vLLM's"),
    ("POST /v1/embeddings, /pooling, /classify, /score, /rerank", "not served (generation only)"),
    ("POST /v1/audio/transcriptions, /v1/audio/translations", "not served (text only)"),
]


def _field_rows(vllm_request: type, ours: type, endpoint: str) -> list[str]:
    from server.protocol import CLIENT_TEMPLATE_FIELDS
    from server.serving.lenient import cannot_honour

    rows = []
    for name in sorted(vllm_request.model_fields):
        if name in CLIENT_TEMPLATE_FIELDS:
            what = "400: templates come from the models file only"
        elif name in ours.model_fields:
            what = "taken"
        elif (why := cannot_honour(name)) is not None:
            what = f"400 when it would change the answer: {why}"
        else:
            what = "ignored, named in `x-aligngate-ignored-fields`"
        rows.append(f"| `{name}` | {what} |")
    return [f"### `{endpoint}`", "", "| field | the gateway |", "|---|---|", *rows, ""]


def render() -> str:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import FrontendArgs
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VChat
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest as VCompletion

    from server.cli.serve_command import FRONTEND_FLAGS
    from server.models.models_file import ENGINE_ARGS_AS_ENTRY_FIELDS
    from server.protocol import ChatCompletionRequest, CompletionRequest

    lines = [
        "# Coming from vLLM",
        "",
        "<!-- Written by docs/gen_coming_from_vllm.py from the installed vLLM and the "
        "gateway's code; do not edit. -->",
        "",
        "What the gateway does with each of `vllm serve`'s endpoints, request fields and",
        "engine arguments. A request field the gateway does not take is ignored as vLLM's",
        "server ignores an unknown one, and named in the `x-aligngate-ignored-fields` header;",
        "one that would change the answer and cannot be honoured is a 400 naming it.",
        "",
        "## Endpoints",
        "",
        "| vLLM | the gateway |",
        "|---|---|",
        *(f"| `{route}` | {what} |" for route, what in ENDPOINTS),
        "",
        "## Request fields",
        "",
        *_field_rows(VChat, ChatCompletionRequest, "/v1/chat/completions"),
        *_field_rows(VCompletion, CompletionRequest, "/v1/completions"),
        "## Server flags",
        "",
        "| `vllm serve` | the gateway |",
        "|---|---|",
        *(
            f"| `--{f.name.replace('_', '-')}` | "
            f"{FRONTEND_FLAGS.get(f.name, 'not taken by `aligngate serve`')} |"
            for f in sorted(dataclasses.fields(FrontendArgs), key=lambda f: f.name)
        ),
        "",
        "## Engine arguments",
        "",
        "Every other `vllm serve` engine flag is a field of vLLM's `AsyncEngineArgs`; in the",
        "models file it goes in the entry's `engine_args`, verbatim (an unknown one is refused",
        "at start), except those the entry sets with a field of its own:",
        "",
        "| engine argument | the gateway |",
        "|---|---|",
    ]
    for f in sorted(dataclasses.fields(AsyncEngineArgs), key=lambda f: f.name):
        field = ENGINE_ARGS_AS_ENTRY_FIELDS.get(f.name)
        what = f"the entry's `{field}`" if field else "`engine_args`"
        lines.append(f"| `{f.name}` | {what} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    PAGE.write_text(render())
    print(f"wrote {PAGE}")
