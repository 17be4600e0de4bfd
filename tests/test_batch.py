"""`aligngate alpaca-eval`: alpaca_eval's exact format, input order, resuming after a kill,
the served model's own prompt format, the HTTP mode, and clear errors for bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, Gateway, run_cli, start_gateway, stop_gateway
from tests.data import write_eval_set
from tests.test_render import ALPACA_NO_INPUT


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 AlpacaEval-style instructions: the batch tests need some, not the real 805."""
    return write_eval_set(tmp_path_factory.mktemp("eval") / "eval_set.json", 40)


def alpaca_eval_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_cli(["alpaca-eval", *args], env)


def check_model_outputs(path: Path, n: int, generator: str, eval_set: Path) -> list[dict]:
    """The file alpaca_eval reads: its own loader accepts it; input order; stripped."""
    from alpaca_eval import utils

    outputs = json.loads(path.read_text())
    expected = json.loads(eval_set.read_text())[:n]
    assert [o["instruction"] for o in outputs] == [e["instruction"] for e in expected]
    assert [o["dataset"] for o in outputs] == [e["dataset"] for e in expected]
    assert all(set(o) == {"instruction", "output", "generator", "dataset"} for o in outputs)
    assert all(o["generator"] == generator for o in outputs)
    assert all(o["output"] == o["output"].strip() for o in outputs)
    df = utils.load_or_convert_to_dataframe(str(path))
    assert list(df["instruction"]) == [e["instruction"] for e in expected]
    assert utils.get_generator_name(None, df) == generator
    return outputs


@pytest.mark.slow
def test_resume_after_kill_keeps_finished_items(
    test_env: dict[str, str], tmp_path: Path, eval_set: Path
) -> None:
    out = tmp_path / "model_outputs.json"
    partial = out.with_name(out.name + ".partial.jsonl")
    args = [
        "--model",
        "smollm2-135m-instruct",
        "--instructions",
        str(eval_set),
        "--limit",
        "40",
        "--max-tokens",
        "160",
        "--out",
        str(out),
    ]
    first = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "alpaca-eval", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=test_env,
        cwd=REPO,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None:
        if partial.exists() and len(partial.read_text().splitlines()) >= 3:
            os.killpg(first.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    first.wait()
    assert not out.exists(), "the run should have been interrupted"
    kept = {
        json.loads(line)["index"]: json.loads(line)["output"]
        for line in partial.read_text().splitlines()
        if line.strip()
    }
    assert 3 <= len(kept) < 40

    second = alpaca_eval_cli(args, test_env)
    assert second.returncode == 0, second.stderr
    assert f"{40 - len(kept)} generated, {len(kept)} resumed" in second.stderr
    # Not a terminal: plain progress lines, no bar (the last one at the end).
    assert "alpaca-eval: 40/40 req (100%)" in second.stderr and "\r" not in second.stderr
    outputs = check_model_outputs(out, 40, "smollm2-135m-instruct", eval_set)
    for index, text in kept.items():
        assert outputs[index]["output"] == text.strip()
    assert not partial.exists()
    assert "tok/s; finish reasons:" in second.stderr


def test_server_mode_against_a_running_gateway(
    gateway: Gateway, test_env: dict[str, str], tmp_path: Path, eval_set: Path
) -> None:
    out = tmp_path / "outputs.json"
    result = alpaca_eval_cli(
        [
            "--model",
            gateway.model,
            "--server",
            gateway.url,
            "--instructions",
            str(eval_set),
            "--limit",
            "16",
            "--max-tokens",
            "16",
            "--out",
            str(out),
            "--generator",
            "smol-http",
            "--concurrency",
            "8",
        ],
        test_env,
    )
    assert result.returncode == 0, result.stderr
    check_model_outputs(out, 16, "smol-http", eval_set)


@pytest.fixture(scope="module")
def cut_config(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cut") / "models.yaml"
    path.write_text(
        f"models:\n  - {{name: tiny-cut, path: {tiny_dir / 'llama'}, family: cut, "
        "max_model_len: 1024}\n"
    )
    return path


@pytest.fixture(scope="module")
def cut_gateway(
    cut_config: Path, test_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    gw = start_gateway(
        ["--config", str(cut_config)], tmp_path_factory.mktemp("cut-gw") / "serve.log", test_env
    )
    gw.model = "tiny-cut"
    yield gw
    assert stop_gateway(gw) == 0


@pytest.mark.slow
def test_alpaca_template_model_gets_the_cut_prompts(
    cut_config: Path,
    cut_gateway: Gateway,
    test_env: dict[str, str],
    tmp_path: Path,
    eval_set: Path,
) -> None:
    """Greedy output of a random model is a fingerprint of its exact input ids: the batch
    output equals a raw completion of the CUT Alpaca prompt, in both modes."""
    out_local, out_http = tmp_path / "local.json", tmp_path / "http.json"
    common = [
        "--model",
        "tiny-cut",
        "--instructions",
        str(eval_set),
        "--limit",
        "4",
        "--max-tokens",
        "12",
    ]
    local = alpaca_eval_cli(
        [*common, "--config", str(cut_config), "--out", str(out_local)], test_env
    )
    assert local.returncode == 0, local.stderr
    http = alpaca_eval_cli([*common, "--server", cut_gateway.url, "--out", str(out_http)], test_env)
    assert http.returncode == 0, http.stderr
    local_out = json.loads(out_local.read_text())
    assert [o["output"] for o in local_out] == [
        o["output"] for o in json.loads(out_http.read_text())
    ]
    for item in local_out:
        raw = httpx.post(
            f"{cut_gateway.url}/v1/completions",
            json={
                "model": "tiny-cut",
                "temperature": 0,
                "max_tokens": 12,
                "prompt": ALPACA_NO_INPUT.format(instruction=item["instruction"]),
            },
            timeout=60,
        ).json()
        assert raw["choices"][0]["text"].strip() == item["output"]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "cannot read"),
        ("{not json", "neither a JSON list nor JSONL"),
        ('[{"prompt": "x"}]', "has no string `instruction`"),
        ("[]", "non-empty list"),
    ],
)
def test_bad_instruction_files_are_clear_errors(
    test_env: dict[str, str], tmp_path: Path, content: str | None, needle: str
) -> None:
    path = tmp_path / "instructions.json"
    if content is not None:
        path.write_text(content)
    result = alpaca_eval_cli(
        [
            "--model",
            "smollm2-135m-instruct",
            "--instructions",
            str(path),
            "--out",
            str(tmp_path / "o.json"),
        ],
        test_env,
    )
    assert result.returncode == 2
    assert needle in result.stderr


def test_no_instructions_offline_names_the_flag(test_env: dict[str, str], tmp_path: Path) -> None:
    env = dict(test_env, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = alpaca_eval_cli(
        ["--model", "smollm2-135m-instruct", "--out", str(tmp_path / "o.json")], env
    )
    assert result.returncode == 2
    assert "--instructions" in result.stderr
