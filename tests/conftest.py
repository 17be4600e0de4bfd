"""One real gateway per test session: `aligngate serve` on the embedded default model,
real vLLM on the CPU, reached over loopback HTTP like any client would."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from server.models.default_model import DEFAULT_MODEL_NAME, ensure_default_model
from tests.otlp_collector import Collector, start_collector

REPO = Path(__file__).resolve().parents[1]
# Inside the repo (git-ignored): a rerun reuses the converted model; CI starts clean.
TEST_HOME = REPO / ".cache" / "test-home"
START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Gateway:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    model: str = DEFAULT_MODEL_NAME

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class _PortTaken(RuntimeError):
    pass


def start_gateway(args: list[str], log_path: Path, env: dict[str, str]) -> Gateway:
    """``aligngate serve`` on a free loopback port, once healthy. A port taken between
    choosing it and the gateway binding it (its first act; a Ray driver binds ephemeral
    ports of its own) gets the gateway started again on another one."""
    for _ in range(2):
        with contextlib.suppress(_PortTaken):
            return _start_gateway_once(args, log_path, env)
    return _start_gateway_once(args, log_path, env)


def _start_gateway_once(args: list[str], log_path: Path, env: dict[str, str]) -> Gateway:
    port = free_port()
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *args,
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=REPO,
        # Its own process group, so a test can kill the gateway and its engines at once.
        start_new_session=True,
    )
    gateway = Gateway(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            if "address already in use" in log_path.read_text(errors="replace").lower():
                raise _PortTaken(port)
            raise RuntimeError(f"gateway exited with {process.returncode}:\n{gateway.log_tail()}")
        try:
            if httpx.get(f"{gateway.url}/health", timeout=2).status_code == 200:
                return gateway
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_gateway(gateway)
    raise RuntimeError(
        f"gateway did not become healthy in {START_TIMEOUT_S}s:\n{gateway.log_tail()}"
    )


def start_own_gateway(
    folder: Path, models_yaml: str, test_env: dict[str, str], env: dict[str, str]
) -> Gateway:
    """A gateway of a test module's own: its models file, its own store, extra settings."""
    models = folder / "models.yaml"
    models.write_text(models_yaml)
    env = {**test_env, "ALIGNGATE_DATABASE_URL": f"sqlite:///{folder / 'store.db'}", **env}
    return start_gateway(["--config", str(models)], folder / "serve.log", env)


def kill_gateway(gateway: Gateway) -> None:
    """kill -9 the gateway and its engine processes: a crash, not a shutdown."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(gateway.process.pid, signal.SIGKILL)
    gateway.process.kill()
    gateway.process.wait(timeout=30)


def stop_gateway(gateway: Gateway, timeout: float = 60) -> int:
    if gateway.process.poll() is None:
        gateway.process.send_signal(signal.SIGTERM)
        try:
            gateway.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            gateway.process.kill()
            gateway.process.wait()
    return gateway.process.returncode


@pytest.fixture(scope="session")
def test_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The gateways' environment: the shared model cache, a fresh store per session."""
    TEST_HOME.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["ALIGNGATE_HOME"] = str(TEST_HOME)
    db = tmp_path_factory.mktemp("store") / "aligngate.db"
    env["ALIGNGATE_DATABASE_URL"] = f"sqlite:///{db}"
    env.setdefault("ALIGNGATE_CPU_KV_CACHE_GIB", "1")
    # The gateway's one KV-cache setting is the one above; vLLM's own beside it must agree.
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    # Tests post feedback faster than a person; the limit has its own test.
    env["ALIGNGATE_FEEDBACK_PER_MINUTE"] = "0"
    # No held-out share: the tests count what trains and exports exactly, and a random
    # completion id would be held out one time in ten; tests/test_holdout.py sets it.
    env["ALIGNGATE_HOLDOUT"] = "0"
    env["ALIGNGATE_ADAPTERS_DIR"] = str(tmp_path_factory.mktemp("adapters"))
    return env


@pytest.fixture(scope="session")
def adapters_root(test_env: dict[str, str]) -> Path:
    return Path(test_env["ALIGNGATE_ADAPTERS_DIR"])


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    return ensure_default_model(TEST_HOME / "models")


@pytest.fixture(scope="session")
def gateway(
    default_model_path: Path, test_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    log_path = tmp_path_factory.mktemp("gateway") / "serve.log"
    gw = start_gateway([], log_path, test_env)
    yield gw
    code = stop_gateway(gw)
    log = gw.log_path.read_text(errors="replace")
    assert code == 0, f"gateway exited with {code} on SIGTERM:\n{gw.log_tail()}"
    assert "Traceback" not in log, f"gateway logged a traceback:\n{gw.log_tail(120)}"


# `aligngate serve MODEL [vLLM flags]` as a vLLM user starts it: one folder, engine flags, a key,
# JSON logs, traces to a collector (tests/test_serve_command.py, tests/test_telemetry.py).
SERVED_FOLDER_KEY = "serve-command-test-key-0123"


@pytest.fixture(scope="session")
def otlp_collector() -> Iterator[Collector]:
    collector, server = start_collector()
    yield collector
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def served_folder(
    default_model_path: Path,
    test_env: dict[str, str],
    otlp_collector: Collector,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Gateway]:
    folder = tmp_path_factory.mktemp("serve-model")
    env = {
        **test_env,
        "ALIGNGATE_DATABASE_URL": f"sqlite:///{folder / 'store.db'}",
        "ALIGNGATE_ACCESS_LOG": "true",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
        "OTEL_BSP_SCHEDULE_DELAY": "200",  # spans reach the collector within a second
    }
    env.pop("ALIGNGATE_CONFIG", None)
    args = [
        str(default_model_path),
        "--max-model-len",
        "2048",
        "--served-model-name",
        "tiny",
        "--api-key",
        SERVED_FOLDER_KEY,
        "--log-format",
        "json",
        "--otlp-traces-endpoint",
        otlp_collector.url,
    ]
    gateway = start_gateway(args, folder / "serve.log", env)
    gateway.model = "tiny"
    yield gateway
    assert stop_gateway(gateway) == 0, gateway.log_tail()


@pytest.fixture(scope="session")
def tokenizer(default_model_path: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_path))


@pytest.fixture(scope="session")
def tiny_dir(default_model_path: Path) -> Path:
    """Tiny random checkpoints of each family's architecture (built once per home)."""
    from tests.tiny_checkpoints import build

    root = TEST_HOME / "tiny"
    root.mkdir(parents=True, exist_ok=True)
    for kind in ("llama", "mistral", "gptj", "chat"):
        build(default_model_path, root / kind, kind)
    return root


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    from tests.postgres import pg_bin, postgres_server

    if pg_bin() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed: .ci/run must install it")
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    with postgres_server(free_port()) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    from tests.postgres import create_database

    return create_database(request.getfixturevalue("postgres_admin_url"))


def run_cli(
    args: list[str], env: dict[str, str] | None, timeout: float = 600, module: str = "server.cli"
) -> subprocess.CompletedProcess[str]:
    """`aligngate ARGS` (or `python -m MODULE ARGS`) as a user runs it, from the repo root."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=timeout,
    )


CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture
def browser() -> Iterator[object]:
    """Debian's Chromium under Playwright, headless, no network beyond loopback. Per test:
    Playwright's sync API keeps an event loop running in this thread until it stops, and
    later tests call asyncio.run."""
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("Chromium is not installed: .ci/run must install it")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield browser
        browser.close()


ARENA_ADAPTER = "arena-lora"


@pytest.fixture(scope="session")
def arena_adapter(default_model_path: Path, adapters_root: Path) -> str:
    """A second model to battle the default one, cheaply: a LoRA adapter of the default model
    with small random weights (no training), saved under the session's adapters root. Its
    answers differ from the base model's; it renders with the same template, so arena votes
    between the two are DPO pairs."""
    folder = adapters_root / ARENA_ADAPTER
    if not (folder / "adapter_model.safetensors").is_file():
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(str(default_model_path), dtype=torch.float32)
        config = LoraConfig(
            r=8, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"]
        )
        model = get_peft_model(base, config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.02)
        model.save_pretrained(str(folder))
    return ARENA_ADAPTER
