"""vLLM's own parser for `vllm serve`'s engine flags, so that `aligngate serve MODEL
--max-model-len 2k --enable-lora ...` means exactly what it means to `vllm serve`: the same
names, types, choices, human-readable sizes (``2k``), JSON and dotted config flags
(``--compilation-config.mode 0``) and ``-O`` levels.

Owns: building that parser, and reading back which engine arguments a command line set
(and vLLM's defaults for the rest). Does not know: the gateway's own flags (the command
line adds them to this parser) or how engine arguments become a models-file entry.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EngineFlags:
    """The engine arguments a command line set (by ``AsyncEngineArgs`` field name), and
    vLLM's defaults for every field, as its parser fills them in."""

    given: dict[str, Any]
    defaults: dict[str, Any]


def engine_flag_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser holding every ``AsyncEngineArgs`` flag, grouped and documented as vLLM groups
    them (``--help=ModelConfig``, ``--help=all``, ``--help=max-model-len``)."""
    from server.engine.core_process import note_environment_before_vllm

    note_environment_before_vllm()  # the fork server of engine cores needs it (core_process)
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class _Parser(FlexibleArgumentParser):  # type: ignore[misc]
        def _pull_args_from_config(self, args: list[str]) -> list[str]:
            # vLLM reads `--config FILE` as a YAML file of its own flags; on aligngate's
            # command line `--config` is the models file, an argument like any other.
            return args

    parser = _Parser(prog=prog, description=description)
    AsyncEngineArgs.add_cli_args(parser)
    return parser


def engine_flags(
    parser: argparse.ArgumentParser, parsed: argparse.Namespace, argv: list[str]
) -> EngineFlags:
    """The engine arguments ``argv`` (parsed into ``parsed``) gives, its value even when it
    is vLLM's default: the gateway's own defaults may differ (``--no-enforce-eager`` on a
    CPU, ``--gpu-memory-utilization 0.9`` beside the resource plan's share)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    names = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    defaults = vars(parser.parse_args([]))
    # Parsed again with every default suppressed: only what argv names is set.
    saved = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        named = set(vars(parser.parse_args(argv)))
    finally:
        for action, default in saved:
            action.default = default
    values = vars(parsed)
    given = {name: values[name] for name in names & named}
    return EngineFlags(given=given, defaults={n: defaults.get(n) for n in names})


def server_flag_names() -> dict[str, str]:
    """`vllm serve`'s own server flags (vLLM's ``FrontendArgs``: ``--chat-template``,
    ``--tool-call-parser``, ...) by option string, with their field name; a boolean's
    ``--no-`` form too."""
    from vllm.entrypoints.launchers.cli_args import FrontendArgs

    flags = {}
    for field in dataclasses.fields(FrontendArgs):
        option = "--" + field.name.replace("_", "-")
        flags[option] = field.name
        if field.type in (bool, "bool"):
            flags["--no-" + option.removeprefix("--")] = field.name
    return flags
