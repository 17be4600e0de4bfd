"""``aligngate serve [MODEL] [vLLM engine flags]``: the serve command's parser, and what a
command line serves.

The parser is vLLM's own engine-flag parser (``engine.engine_flags``) with the gateway's
flags beside it, so `vllm serve`'s engine flags keep their meaning. A command line serves a
models file (``--config`` / ``ALIGNGATE_CONFIG``), or one model from MODEL and its flags
(the embedded default model without MODEL); both at once is an error.

Owns: the serve command line, and what the gateway answers to `vllm serve`'s own server
flags (``FRONTEND_FLAGS``, also the docs' table). Does not know: serving.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pydantic import ValidationError

from server.engine.engine_flags import (
    EngineFlags,
    engine_flag_parser,
    engine_flags,
    server_flag_names,
)
from server.models.command_line_entry import entry_from_engine_args, flag
from server.models.models_file import (
    Deployment,
    ModelEntry,
    ModelsFileError,
    default_deployment,
    load_deployment,
)
from server.settings import Settings

log = logging.getLogger("aligngate")

FAMILIES = ("cut", "kto", "dpo", "quark", "chat")

# `vllm serve`'s own server flags (vLLM's FrontendArgs) the gateway has an answer for;
# every other one is not taken (the command line names the flag and says so).
FRONTEND_FLAGS = {
    "host": "`aligngate serve --host` (127.0.0.1 by default)",
    "port": "`aligngate serve --port`",
    "api_key": "`aligngate serve --api-key` or `ALIGNGATE_API_KEY`; several keys with ids, "
    "limits and tenants: a keys file (`ALIGNGATE_API_KEYS_FILE`)",
    "chat_template": "the models file's `template`, per model",
    "trust_request_chat_template": "never: templates come from the models file only",
    "lora_modules": "the models file's `adapters`, or `POST /admin/adapters`",
    "response_role": "always `assistant`",
    "return_tokens_as_token_ids": "not taken (the request field is refused by name)",
    "enable_auto_tool_choice": "`aligngate serve MODEL --enable-auto-tool-choice`, or a "
    "model's `enable_auto_tool_choice` in the models file",
    "tool_call_parser": "`aligngate serve MODEL --tool-call-parser NAME`, or a model's "
    "`tool_call_parser` in the models file",
    "tool_parser_plugin": "not taken: vLLM's own parsers, by name (`--tool-call-parser`)",
    "tool_server": "not taken: hosted tools are refused by name",
    "enable_force_include_usage": "not taken: `stream_options.include_usage` per request",
    "allowed_origins": "no CORS; other sites' state-changing requests are refused (SECURITY.md)",
    "uds": "not taken: TCP on the address given",
}
GATEWAY_TAKES = {"host", "port", "api_key", "enable_auto_tool_choice", "tool_call_parser"}


def add_gateway_flags(parser: argparse.ArgumentParser) -> None:
    """The gateway's own serve flags (``--help=aligngate`` lists them)."""
    parser.add_argument(
        "model_tag",
        nargs="?",
        metavar="MODEL",
        help="a checkpoint folder to serve alone, as `vllm serve MODEL` (default: the "
        "embedded model); give it first, then any `vllm serve` engine flag",
    )
    group = parser.add_argument_group(
        "aligngate", "The gateway's own flags; every other flag is a `vllm serve` engine flag."
    )
    group.add_argument(
        "--config", type=Path, help="models file (YAML): several models, judges, a cluster"
    )
    group.add_argument(
        "--family",
        choices=FAMILIES,
        help="MODEL's prompt format (default: detected from the checkpoint)",
    )
    group.add_argument(
        "--tool-call-parser",
        metavar="NAME",
        help="the vLLM tool parser that reads MODEL's tool calls (hermes, llama3_json, "
        "mistral, ...), as `vllm serve`'s; the chat template must take `tools`",
    )
    group.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help="serve `tool_choice: auto` (the default with tools) through --tool-call-parser, "
        "as `vllm serve`'s; `required` and named functions need neither flag",
    )
    group.add_argument("--host", help="listen address (default 127.0.0.1)")
    group.add_argument("--port", type=int, help="listen port (default 8000)")
    group.add_argument(
        "--api-key",
        nargs="+",
        metavar="KEY",
        help="inference keys, as vLLM's (default: ALIGNGATE_API_KEY, which keeps the key "
        "out of the process list); at least 16 characters each",
    )
    group.add_argument(
        "--log-format",
        choices=("text", "json"),
        help="log lines as text or one JSON object per line, each with its request id "
        "(default: ALIGNGATE_LOG_FORMAT, else text)",
    )
    group.add_argument(
        "--forwarded-allow-ips",
        help="proxies whose X-Forwarded-* headers are believed (comma-separated addresses or "
        "networks, '*': any); default: none, the client address is the socket's",
    )


def serve_parser() -> argparse.ArgumentParser:
    parser = engine_flag_parser(
        "aligngate serve",
        "Serve models over the OpenAI-compatible HTTP API: a models file (--config), or "
        "one checkpoint folder with `vllm serve`'s engine flags.",
    )
    add_gateway_flags(parser)
    parser.epilog = (
        "--help=aligngate: the gateway's flags; --help=all: every flag; --help=GROUP: one "
        "group (ModelConfig, CacheConfig, ...); --help=NAME: the flags whose name holds NAME."
    )
    return parser


def _refuse_server_flags(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """A `vllm serve` server flag the gateway does not take is an error that says what the
    gateway does instead (vLLM's parser would only call it unrecognized)."""
    known = server_flag_names()
    for arg in argv:
        if not arg.startswith("--"):
            continue
        option = arg.split("=", 1)[0].replace("_", "-")
        name = known.get(option)
        if name is not None and name not in GATEWAY_TAKES:
            answer = FRONTEND_FLAGS.get(name, "not taken by `aligngate serve`")
            parser.error(
                f"{option} is a `vllm serve` server flag; in aligngate: {answer} "
                "(docs/coming-from-vllm.md lists each)"
            )


def parse_serve_args(argv: list[str]) -> argparse.Namespace:
    """The serve command line; ``engine`` holds the engine flags it set."""
    parser = serve_parser()
    _refuse_server_flags(parser, argv)
    args = parser.parse_args(argv)
    for key in args.api_key or []:
        if args.model_tag is None and Path(key).expanduser().is_dir():
            # `--api-key` takes one or more keys, as vLLM's: a folder after it was MODEL.
            parser.error(f"--api-key took the folder {key!r}: give MODEL first")
    args.engine = engine_flags(parser, args, argv)
    # vLLM's flag, and the gateway's too: its own spans and every engine's (``registry``).
    args.engine.given.pop("otlp_traces_endpoint", None)
    return args


def serve_deployment(args: argparse.Namespace, settings: Settings) -> Deployment:
    """What ``aligngate serve`` serves: the models file, or the one model its command line
    names (with its engine flags), or the embedded default model."""
    flags: EngineFlags = args.engine
    config = args.config or settings.config
    one_model = [
        *(["MODEL"] if args.model_tag else []),
        *(["--family"] if args.family else []),
        *(["--tool-call-parser"] if args.tool_call_parser else []),
        *(["--enable-auto-tool-choice"] if args.enable_auto_tool_choice else []),
        *sorted(flag(name) for name in flags.given),
    ]
    if config is not None:
        if one_model:
            source = "--config" if args.config else "ALIGNGATE_CONFIG"
            raise ModelsFileError(
                f"{', '.join(one_model)}: a models file ({source} {config}) already says what "
                "is served and how; give MODEL and engine flags without one, or put them in "
                "the file (a model's `engine_args`)"
            )
        return load_deployment(config)
    if not one_model:
        return default_deployment()
    entry = entry_from_engine_args(
        flags.given, flags.defaults, model=args.model_tag, family=args.family
    )
    if args.tool_call_parser or args.enable_auto_tool_choice:
        try:
            entry = ModelEntry.model_validate(
                {
                    **entry.model_dump(exclude_unset=True),
                    "tool_call_parser": args.tool_call_parser,
                    "enable_auto_tool_choice": args.enable_auto_tool_choice,
                }
            )
        except ValidationError as exc:
            problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
            flags_named = "--tool-call-parser/--enable-auto-tool-choice"
            raise ModelsFileError(f"{flags_named}: {problems}") from None
    log.info("serving %s as %r (family: %s)", entry.path, entry.name, entry.family or "detected")
    return Deployment(models=[entry])
