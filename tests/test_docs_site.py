"""The documentation: the site builds with ``mkdocs build --strict`` (its reference pages
generated from the code at build time by docs/hooks.py), and every shell or Python code block
in README.md and docs/ runs, or says on the line just before it why it cannot:
``<!-- not run: REASON -->``.

The blocks run against the test session's gateway (the embedded model, keyless loopback):
``http://127.0.0.1:8000``, ``127.0.0.1:8000`` and ``localhost:8000`` in a block are replaced by
that gateway's address before it runs. Bash blocks run with ``bash -euo pipefail`` from the
repository root, with this interpreter's folder (``.venv/bin``) first on PATH, the session's
environment (``test_env``) and this checkout first on PYTHONPATH; ``curl`` there fails on an
HTTP error status (``--fail-with-body``), so an example the gateway refuses fails its block.
A block that starts ``aligngate serve ... &`` gets a gateway of its own instead: a free port
(``ALIGNGATE_PORT``, and the addresses above become it), its own store and adapters root.
Python blocks run with this interpreter. Each block has a time limit, must leave the checkout
as it found it, and a failure names its file:line. ``pytest -s`` shows the build time and the
blocks' run time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, Gateway, free_port

pytestmark = pytest.mark.slow

RUN = {"bash", "sh", "shell", "console", "python", "py"}
MARKER = re.compile(r"^\s*<!--\s*not run:\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^\s`]*)")
ADDRESS = re.compile(r"(http://)?(?:127\.0\.0\.1|localhost):8000\b")
OWN_GATEWAY = re.compile(r"aligngate serve\b[^\n#]*&")
TIMEOUT_S = 120
OWN_GATEWAY_TIMEOUT_S = 480  # its own start, a training run; 85 s here alone, 229 s under load
# `curl` in a block fails on an HTTP error status and still prints the error body, unless
# the block asks for `--fail` itself (curl refuses the two together).
BASH_PRELUDE = """curl() {
  local arg
  for arg in "$@"; do
    case "$arg" in --fail | --fail-with-body | -[!-]*f*) command curl "$@"; return ;; esac
  done
  command curl --fail-with-body "$@"
}
"""


@dataclass
class Block:
    path: Path
    line: int  # the opening fence's, 1-based
    language: str
    code: str
    not_run: str | None  # the marker's reason

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def code_blocks(path: Path) -> tuple[list[Block], list[str]]:
    """The fenced blocks of a Markdown file, and what is wrong with its markers and fences
    (a fence without a language, a marker with no block after it or no reason)."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    where = path.relative_to(REPO)
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            marker = MARKER.match(lines[i])
            if marker is not None and not (i + 1 < len(lines) and FENCE.match(lines[i + 1])):
                problems.append(f"{where}:{i + 1}: a `not run` marker with no block after it")
            i += 1
            continue
        indent, fence, language = opening.groups()
        end = i + 1
        while end < len(lines) and lines[end].strip() != fence:
            end += 1
        body = [line.removeprefix(indent) for line in lines[i + 1 : end]]
        marker = MARKER.match(lines[i - 1]) if i > 0 else None
        if not language:
            problems.append(f"{where}:{i + 1}: a code block without a language")
        if marker is not None and not marker.group(1):
            problems.append(f"{where}:{i}: a `not run` marker without a reason")
        blocks.append(
            Block(path, i + 1, language.lower(), "\n".join(body) + "\n", marker and marker[1])
        )
        i = end + 1
    return blocks, problems


def all_blocks() -> tuple[list[Block], list[str]]:
    blocks, problems = [], []
    for path in doc_files():
        found, wrong = code_blocks(path)
        blocks += [b for b in found if b.language in RUN]
        problems += wrong
    return blocks, problems


def checkout_state() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=all"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode == 0:
            return done.stdout
    return None


def stop_group(pgid: int) -> None:
    """What a block left running (a gateway it started in the background) stops with it."""
    for sig, wait_s in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def run_block(
    block: Block, env: dict[str, str], address: str, folder: Path, limit_s: float
) -> tuple[int | None, str]:
    """The block's exit status (None: past its time limit) and its output. ``address``:
    HOST:PORT of the gateway the block's examples talk to."""
    code = ADDRESS.sub(lambda found: (found[1] or "") + address, block.code)
    if block.language in ("python", "py"):
        script = folder / "block.py"
        script.write_text(code)
        command = [sys.executable, str(script)]
    else:
        if block.language == "console":  # the commands, without their prompts and output
            code = "\n".join(line[2:] for line in code.splitlines() if line.startswith("$ "))
        command = ["bash", "-euo", "pipefail", "-c", BASH_PRELUDE + code]
    log_path = folder / "output.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            status: int | None = process.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            status = None
        finally:
            stop_group(process.pid)
            process.wait()
    return status, log_path.read_text(errors="replace")


def block_env(test_env: dict[str, str]) -> dict[str, str]:
    return {
        **test_env,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{test_env.get('PATH', '')}",
        # The `aligngate` console script imports `server` through the editable install, which
        # may point at another checkout of the project; the blocks document this one.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), test_env.get("PYTHONPATH")])),
        "NO_MKDOCS_2_WARNING": "1",
    }


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    from server.cli.main import build_parser
    from server.settings import Settings

    site = tmp_path / "site"
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    seconds = time.perf_counter() - started
    print(f"\nmkdocs build --strict: {seconds:.1f} s")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]

    def page(name: str) -> str:
        return (site / name / "index.html").read_text()

    http_api = page("reference/http-api")
    for route in ("/v1/chat/completions", "/v1/feedback", "/admin/feedback/review", "/ui/arena"):
        assert f"<code>{route}</code>" in http_api, route
    environment = page("reference/environment")
    for name in Settings.model_fields:
        assert f"<code>ALIGNGATE_{name.upper()}</code>" in environment, name
    assert "ALIGNGATE_API_KEYS" in environment
    cli = page("reference/cli")
    assert "--forwarded-allow-ips" in cli and "Coming from vLLM" in cli
    # The serve section shows the gateway's flags and points at vLLM's, not hundreds of them.
    assert "--max-model-len" not in cli and "--gpu-memory-utilization" not in cli

    def commands(parser: argparse.ArgumentParser, words: list[str]) -> Iterator[str]:
        yield " ".join(words)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from commands(sub, [*words, name])

    for command in commands(build_parser(), ["aligngate"]):
        assert f"<code>{command}</code>" in cli, command
    models_file = page("reference/models-file")
    for key in ("judges", "cluster", "max_model_len", "api_key_env"):
        assert f"<code>{key}</code>" in models_file, key
    assert (site / "reference" / "openapi.json").is_file()
    for screenshot in ("ui-chat.png", "ui-feedback.png", "ui-arena.png", "ui-leaderboard.png"):
        assert screenshot in page("feedback/web-ui"), screenshot
        assert (site / screenshot).is_file(), screenshot


def test_every_code_block_runs_or_says_why_not(
    gateway: Gateway, test_env: dict[str, str], tmp_path: Path
) -> None:
    blocks, problems = all_blocks()
    assert not problems, "\n".join(problems)
    before = checkout_state()
    env = block_env(test_env)
    failures: list[str] = []
    ran: list[tuple[Block, float]] = []
    for number, block in enumerate(b for b in blocks if b.not_run is None):
        folder = tmp_path / f"block-{number}"
        folder.mkdir()
        address, block_vars, limit = gateway.url.removeprefix("http://"), env, TIMEOUT_S
        if OWN_GATEWAY.search(block.code):
            port = free_port()
            address, limit = f"127.0.0.1:{port}", OWN_GATEWAY_TIMEOUT_S
            block_vars = {
                **env,
                "ALIGNGATE_PORT": str(port),
                "ALIGNGATE_DATABASE_URL": f"sqlite:///{folder / 'store.db'}",
                "ALIGNGATE_ADAPTERS_DIR": str(folder / "adapters"),
            }
        started = time.perf_counter()
        status, output = run_block(block, block_vars, address, folder, limit)
        ran.append((block, time.perf_counter() - started))
        if status != 0:
            what = f"timed out after {limit} s" if status is None else f"exit status {status}"
            failures.append(f"{block.where} ({block.language}): {what}\n{output[-3000:]}")
    total = sum(seconds for _, seconds in ran)
    marked = [b for b in blocks if b.not_run is not None]
    print(f"\ncode blocks: {len(ran)} ran in {total:.1f} s, {len(marked)} marked not run")
    for block, seconds in sorted(ran, key=lambda item: -item[1]):
        print(f"  {seconds:6.1f} s  {block.where}")
    for block in marked:
        print(f"  not run  {block.where}: {block.not_run}")
    assert not failures, "\n\n".join(failures)
    after = checkout_state()
    assert before == after, f"the blocks changed the checkout:\n{before}\n---\n{after}"
