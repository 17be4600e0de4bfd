"""CLI habits (issue 31, item 5): help on every flag, one name per concept across commands
(``--limit`` for "only the first N", ``--out`` for a file written, ``--json`` only as "print
JSON"), and no secret as a flag value (the process list shows it) — except ``serve
--api-key``, vLLM's own flag, which warns."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.cli.main import build_parser
from server.cli.training import _admin_headers
from server.settings import Settings


def _commands(
    parser: argparse.ArgumentParser, path: str
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, f"{path} {name}")


def _all() -> list[tuple[str, argparse.ArgumentParser]]:
    from loadtest.cli import build_parser as loadtest_parser
    from server.cli.serve_command import add_gateway_flags

    serve = argparse.ArgumentParser(prog="aligngate serve")
    add_gateway_flags(serve)  # the serve command's own flags (the rest are vLLM's)
    return [
        *_commands(build_parser(), "aligngate"),
        ("aligngate serve", serve),
        *_commands(loadtest_parser(), "python -m loadtest"),
    ]


def _options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        if action.option_strings and not isinstance(
            action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)
        ):
            yield action


def test_every_flag_has_help() -> None:
    missing = [
        f"{command} {action.option_strings[0]}"
        for command, parser in _all()
        for action in _options(parser)
        if not action.help
    ]
    assert not missing, missing


def test_one_name_per_concept_and_no_secret_in_a_flag() -> None:
    wrong = []
    for command, parser in _all():
        for action in _options(parser):
            flag = action.option_strings[-1]
            takes_value = action.nargs != 0
            if flag in ("--n", "--hf-n") or flag.startswith("--num-items"):
                wrong.append(f"{command} {flag}: use --limit")
            if flag == "--json" and takes_value:
                wrong.append(f"{command} {flag}: --json prints JSON; a file written is --out")
            words = set(flag.removeprefix("--").split("-"))
            secret = bool(words & {"key", "token", "password", "secret"})
            vllms_own = (command, flag) == ("aligngate serve", "--api-key")
            if secret and takes_value and not flag.endswith(("-file", "-id")) and not vllms_own:
                wrong.append(f"{command} {flag}: a secret comes from the environment or a file")
    assert not wrong, wrong


def test_the_admin_key_comes_from_a_file_or_the_environment(tmp_path: Path) -> None:
    key_file = tmp_path / "admin.key"
    key_file.write_text("from-the-file-0123456789\n")
    parsed = build_parser().parse_args(["align", "--model", "m", "--admin-key-file", str(key_file)])
    settings = Settings(admin_key="from-the-environment-0123")
    assert _admin_headers(parsed, settings) == {"authorization": "Bearer from-the-file-0123456789"}
    parsed = build_parser().parse_args(["align", "--model", "m"])
    assert _admin_headers(parsed, settings) == {"authorization": "Bearer from-the-environment-0123"}


def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    from server.telemetry.progress import Progress

    with (
        caplog.at_level(logging.INFO, logger="aligngate.progress"),
        Progress("judge j", 4, unit="completion", interval_s=0, terminal=False) as lines,
    ):
        lines.update(2)
        lines.note("2 ties")
        lines.update(2)
    said = [r.getMessage() for r in caplog.records]
    assert said[0].startswith("judge j: 2/4 completion (50%) in ")
    assert said[-1].startswith("judge j: 4/4 completion (100%) in ") and said[-1].endswith(
        ", 2 ties"
    )
    with Progress("train", None, unit="step", terminal=True) as bar:
        bar.set_total(3)
        bar.update(3)
    assert "train: 100%" in capsys.readouterr().err  # tqdm's bar


def test_a_bad_key_file_is_refused_before_anything_runs(tmp_path: Path) -> None:
    from server.cli.main import main

    empty = tmp_path / "empty.key"
    empty.write_text("")
    assert main(["align", "--model", "m", "--admin-key-file", str(empty)]) == 2
    assert main(["align", "--model", "m", "--admin-key-file", str(tmp_path / "absent")]) == 2
