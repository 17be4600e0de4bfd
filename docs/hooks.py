"""MkDocs hooks (mkdocs.yml `hooks:`): the reference pages, written at build time from the code
so they cannot go stale, and never committed.

- reference/cli.md: every `aligngate` command and flag, from the command line's parsers;
- reference/models-file.md: the models file's keys and JSON Schema, from its pydantic models;
- reference/environment.md: every `ALIGNGATE_*` variable, from `server.settings.Settings`
  (a field's meaning is its `description`, else the `#` comment just above it or beside it
  in server/settings.py, read with `tokenize`);
- reference/http-api.md: every route, from the app's OpenAPI document (the app is built
  with no models: engines start in its lifespan, which a build never enters).

A field with no meaning in the code is a build warning, so `mkdocs build --strict` fails until
it gets one. Owns: turning code into Markdown. Does not know: the hand-written pages.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import io
import json
import logging
import os
import sys
import tokenize
import types
import typing
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("mkdocs.hooks.reference")

GENERATED = "<!-- Generated at build time by docs/hooks.py from the code; not committed. -->"

# Settings fields whose source has no comment of their own: the comment they share, or words.
SHARES_COMMENT = {"api_keys_file": "api_keys", "tokens_per_minute": "requests_per_minute"}
MEANING = {
    "host": "Listen address (`aligngate serve --host` wins over it).",
    "port": "Listen port; 0 takes a free one (`aligngate serve --port` wins over it).",
    "log_level": "Python logging level of the gateway's log (`debug`, `info`, `warning`, …).",
}


def on_config(config: Any) -> Any:
    # Document this checkout's code, whichever `server` the environment would import.
    if str(REPO) not in sys.path[:1]:
        sys.path.insert(0, str(REPO))
    return config


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    pages = {
        "reference/cli.md": cli_page,
        "reference/models-file.md": models_file_page,
        "reference/environment.md": environment_page,
        "reference/http-api.md": http_api_page,
    }
    for uri, write in pages.items():
        files.append(File.generated(config, uri, content=write()))
    # The documents themselves, for tools (editors checking YAML, API clients).
    for uri, document in (
        ("reference/models-file.schema.json", models_file_schema()),
        ("reference/openapi.json", openapi_document()),
    ):
        files.append(File.generated(config, uri, content=json.dumps(document, indent=2)))
    return files


# -- reading the code -------------------------------------------------------------------------


def field_comments(cls: type) -> dict[str, str]:
    """Per annotated field of ``cls`` (and its bases in this repository): the `#` comment
    lines just above it, else the comment at the end of its line."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        module = sys.modules.get(klass.__module__)
        source_file = getattr(module, "__file__", None)
        if source_file is None or not Path(source_file).resolve().is_relative_to(REPO):
            continue
        source = Path(source_file).read_text()
        lines = source.splitlines()
        trailing = {
            tok.start[0]: tok.string.lstrip("#").strip()
            for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type == tokenize.COMMENT and tok.line[: tok.start[1]].strip()
        }
        node = next(
            n
            for n in ast.walk(ast.parse(source))
            if isinstance(n, ast.ClassDef) and n.name == klass.__name__
        )
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            above = []
            row = stmt.lineno - 2
            while row >= 0 and lines[row].strip().startswith("#"):
                above.insert(0, lines[row].strip().lstrip("#").strip())
                row -= 1
            text = " ".join(above) or trailing.get(stmt.end_lineno or stmt.lineno, "")
            if text:
                found[stmt.target.id] = text
    return found


def meaning(cls: type, name: str, field: Any, comments: dict[str, str]) -> str:
    text = field.description or comments.get(name) or comments.get(SHARES_COMMENT.get(name, ""))
    if cls.__name__ == "Settings" and not text:
        text = MEANING.get(name)
        if not text:  # every variable is documented: strict builds fail until it is
            log.warning("server/settings.py: `%s` has no description or comment", name)
    return text or ""


def type_text(annotation: Any) -> str:
    """A field's type in words a models-file or environment reader knows."""
    from pydantic import BaseModel

    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(type_text(a) for a in args)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (list, tuple):
        return f"list of {type_text(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    if annotation is Any:
        return "any"
    names = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def bounds(field: Any) -> str:
    words = []
    for item in field.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            value = getattr(item, attr, None)
            if value is not None:
                words.append(f"{sign} {value:,}" if isinstance(value, int) else f"{sign} {value}")
        for attr, sign in (("min_length", "length ≥"), ("max_length", "length ≤")):
            value = getattr(item, attr, None)
            if value is not None:
                words.append(f"{sign} {value}")
    return ", ".join(words)


def default_text(field: Any) -> str:
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "its defaults"
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if value is None:
        return "unset"
    if isinstance(value, Path):
        return f"`{str(value).replace(str(Path.home()), '~')}`"
    if isinstance(value, str) and not value:
        return '`""`'
    return f"`{json.dumps(value)}`" if not isinstance(value, str) else f"`{value}`"


def cell(text: str) -> str:
    """Text from the code as one Markdown table cell: outside `code`, `<`, `>` and `*` are
    characters, not markup."""
    parts = " ".join(text.split()).split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;").replace("*", "\\*")
    return "`".join(parts).replace("|", "\\|")


# -- the pages ------------------------------------------------------------------------------


def cli_page() -> str:
    from server.cli.main import build_parser
    from server.cli.serve_command import serve_parser

    # argparse wraps help to the terminal's width: a fixed one, the page's code width.
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "82"
    lines = [
        "# Command line",
        "",
        GENERATED,
        "",
        "Every `aligngate` command and flag, as `aligngate COMMAND --help` prints it.",
        "",
    ]

    def walk(parser: argparse.ArgumentParser, words: list[str]) -> None:
        name = " ".join(words)
        if words == ["aligngate", "serve"]:
            lines.extend(serve_section(serve_parser()))
            return
        level = "#" * max(2, len(words))
        help_text = parser.format_help().rstrip()
        lines.extend([f"{level} `{name}`", "", "```text", help_text, "```", ""])
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(sub, [*words, sub_name])

    try:
        walk(build_parser(), ["aligngate"])
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    return "\n".join(lines)


def serve_section(parser: argparse.ArgumentParser) -> list[str]:
    """The gateway's own serve flags and MODEL; the engine flags are vLLM's, and the Coming
    from vLLM page lists each."""
    rows = []
    for action in parser._actions:
        if action.dest == "model_tag":
            rows.append(f"| `MODEL` (positional, optional) | {cell(action.help or '')} |")
    group = next(g for g in parser._action_groups if g.title == "aligngate")
    for action in group._group_actions:
        flag = ", ".join(f"`{o}`" for o in action.option_strings)
        if action.choices:
            flag += " " + "\\|".join(f"`{c}`" for c in action.choices)
        elif action.metavar or action.nargs != 0:
            flag += f" `{action.metavar or action.dest.upper()}`"
        rows.append(f"| {flag} | {cell(action.help or '')} |")
    return [
        "## `aligngate serve`",
        "",
        cell(parser.description or ""),
        "",
        "```text",
        "aligngate serve [MODEL] [gateway flags] [vllm serve engine flags]",
        "```",
        "",
        f"{group.description}",
        "",
        "| argument | meaning |",
        "|---|---|",
        *rows,
        "",
        "Beside these, `aligngate serve` takes every `vllm serve` engine flag, parsed by vLLM's "
        "own engine-argument parser: [Coming from vLLM](../coming-from-vllm.md) lists each "
        "engine argument and where it goes, and `aligngate serve --help=all` prints them. "
        "The help's own words:",
        "",
        "```text",
        parser.epilog or "",
        "```",
        "",
    ]


def model_classes(root: type) -> list[type]:
    """``root`` and every pydantic model its fields hold, in the order first met."""
    from pydantic import BaseModel

    seen: list[type] = []

    def visit(annotation: Any) -> None:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation in seen:
                return
            seen.append(annotation)
            for field in annotation.model_fields.values():
                visit(field.annotation)
        for arg in typing.get_args(annotation):
            visit(arg)

    visit(root)
    return seen


def models_file_page() -> str:
    from server.models.models_file import ModelsFile

    lines = [
        "# Models file",
        "",
        GENERATED,
        "",
        "Every key of the models file (`aligngate serve --config models.yaml`), from the "
        "pydantic models that read it. Unknown keys are refused at start, naming them. "
        "[Models file](../serving/models-file.md) explains the file; "
        "[Families](../serving/families.md), [AI judges](../feedback/ai-judges.md), "
        "[GPU deployments](../operations/gpu.md) and "
        "[Scale out on Ray Serve](../operations/ray-serve.md) its sections.",
        "",
    ]
    for cls in model_classes(ModelsFile):
        comments = field_comments(cls)
        title = "the file" if cls is ModelsFile else f"`{cls.__name__}`"
        lines.extend([f"## {cls.__name__}", ""])
        doc = inspect.getdoc(cls)
        if doc and cls is not ModelsFile:
            lines.extend([doc, ""])
        elif cls is ModelsFile:
            lines.extend([f"The top level of {title}: its sections.", ""])
        lines.extend(["| key | type | default | meaning |", "|---|---|---|---|"])
        for name, field in cls.model_fields.items():
            kind = type_text(field.annotation)
            if limit := bounds(field):
                kind += f" ({limit})"
            text = meaning(cls, name, field, comments)
            lines.append(f"| `{name}` | {kind} | {default_text(field)} | {cell(text)} |")
        lines.append("")
    schema = json.dumps(models_file_schema(), indent=2, ensure_ascii=False)
    lines.extend(
        [
            "## JSON Schema",
            "",
            "`ModelsFile.model_json_schema()`, for editors that check YAML against a schema "
            "(also as a file: [models-file.schema.json](models-file.schema.json)).",
            "",
            "```json",
            schema,
            "```",
            "",
        ]
    )
    return "\n".join(lines)


def environment_page() -> str:
    from server.settings import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    comments = field_comments(Settings)
    lines = [
        "# Environment variables",
        "",
        GENERATED,
        "",
        f"Every setting of `server.settings.Settings`: the variable is `{prefix}` + the field's "
        "name in capitals, read once at start. [Settings](../operations/settings.md) groups "
        "them; [Security and limits](../operations/security.md) says what each guard does.",
        "",
        "| variable | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        kind = type_text(field.annotation)
        if limit := bounds(field):
            kind += f" ({limit})"
        text = meaning(Settings, name, field, comments)
        if field.repr is False:
            text += " Never logged."
        variable = f"{prefix}{name}".upper()
        lines.append(f"| `{variable}` | {kind} | {default_text(field)} | {cell(text)} |")
    lines.append("")
    return "\n".join(lines)


def built_app() -> Any:
    """The gateway's FastAPI app with no models: its routes, without starting an engine
    (engines start in the lifespan, which building the app does not enter)."""
    from server.app import build_app
    from server.settings import Settings

    return build_app(Settings(), [])


def openapi_document() -> dict[str, Any]:
    return built_app().openapi()


def models_file_schema() -> dict[str, Any]:
    from server.models.models_file import ModelsFile

    return ModelsFile.model_json_schema()


def http_api_page() -> str:
    app = built_app()
    spec = app.openapi()
    lines = [
        "# HTTP API",
        "",
        GENERATED,
        "",
        "Every route of the gateway, from its OpenAPI document "
        f"(OpenAPI {spec['openapi']}: [openapi.json](openapi.json)). "
        "[Endpoints](../serving/endpoints.md) explains the fields; "
        "[Security and limits](../operations/security.md) says who may call which.",
        "",
        "| method | path | summary | description |",
        "|---|---|---|---|",
    ]
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            description = " ".join((operation.get("description") or "").split())
            lines.append(
                f"| `{method.upper()}` | `{path}` | {cell(operation.get('summary', ''))} "
                f"| {cell(description)} |"
            )
    lines.extend(
        [
            "",
            "Outside the OpenAPI document: the web UI's pages and files "
            "([Web UI](../feedback/web-ui.md)), and FastAPI's own pages about the API.",
            "",
            "| method | path | what |",
            "|---|---|---|",
        ]
    )
    fastapi_own = {app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url}
    for route in app.routes:
        if not hasattr(route, "methods"):  # a mount: static files
            lines.append(f"| `GET` | `{route.path}/…` | the web UI's files |")
        elif route.path in fastapi_own:
            lines.append(f"| `GET` | `{route.path}` | FastAPI's own: the API document |")
        elif not getattr(route, "include_in_schema", True):
            lines.append(f"| `GET` | `{route.path}` | a web UI page |")
    lines.append("")
    return "\n".join(lines)
