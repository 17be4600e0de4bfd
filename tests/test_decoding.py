"""Sampling defaults like vLLM's (issue 33, item 3): a checkpoint's generation_config.json
read as vLLM reads it, ``generation_config: auto | vllm | FOLDER`` per model, and the
precedence request → models file → generation config → family default."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from loadtest.servers import RunningServer, engine_env, raw_vllm
from server.models.decoding import (
    FAMILY,
    MODELS_FILE,
    GenerationConfigError,
    generation_config_values,
    resolve,
)
from tests.conftest import Gateway, start_own_gateway, stop_gateway

GENERATION_CONFIGS: list[dict[str, Any]] = [
    {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_new_tokens": 7},
    {"temperature": 0.2, "top_k": 20, "repetition_penalty": 1.1, "min_p": 0.05},
    {"bos_token_id": 1, "eos_token_id": 2},  # no sampling field: no defaults
    {"temperature": 1.0, "top_p": 1.0},  # transformers' own defaults: no defaults either
]


@pytest.mark.parametrize("config", GENERATION_CONFIGS)
def test_a_generation_config_gives_what_vllm_takes_from_it(
    default_model_path: Path, tmp_path: Path, config: dict[str, Any]
) -> None:
    from vllm.config import ModelConfig

    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    ours, source = generation_config_values(str(tmp_path), default_model_path)
    model = ModelConfig(model=str(default_model_path), generation_config=str(tmp_path))
    assert ours == model.get_diff_sampling_param()
    assert source == str(tmp_path / "generation_config.json")
    # `vllm`: none; `auto`: the checkpoint's own (the embedded model's sets none).
    assert generation_config_values("vllm", default_model_path) == ({}, "")
    auto = ModelConfig(model=str(default_model_path)).get_diff_sampling_param()
    assert generation_config_values("auto", default_model_path)[0] == auto == {}


def test_a_folder_without_a_generation_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(GenerationConfigError, match="does not exist"):
        generation_config_values(str(tmp_path), tmp_path)
    assert generation_config_values("auto", tmp_path) == ({}, "")


def test_precedence_is_models_file_then_generation_config_then_family() -> None:
    merged = resolve(
        {"top_p": 0.5},
        {"top_p": 0.9, "temperature": 0.6},
        "gc.json",
        {"temperature": 0.0, "top_p": 0.95, "max_tokens": 2048},
    )
    assert merged.values == {"temperature": 0.6, "top_p": 0.5, "max_tokens": 2048}
    assert merged.sources == {"temperature": "gc.json", "top_p": MODELS_FILE, "max_tokens": FAMILY}


# --- served: a gateway whose model takes its defaults from a generation config folder ------


@pytest.fixture(scope="module")
def config_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("generation-config")
    config = {"temperature": 0.0, "max_new_tokens": 3, "repetition_penalty": 1.05}
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def served(
    config_folder: Path, test_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    models = (
        "models:\n"
        "  - name: decoded\n"
        "    path: builtin:smollm2-135m-instruct\n"
        "    max_model_len: 2048\n"
        f"    generation_config: {config_folder}\n"
        "    sampling: {repetition_penalty: 1.0}\n"
    )
    gateway = start_own_gateway(tmp_path_factory.mktemp("decoding"), models, test_env, {})
    gateway.model = "decoded"
    yield gateway
    assert stop_gateway(gateway) == 0, gateway.log_tail()


def _chat(url: str, **fields: Any) -> dict[str, Any]:
    body = {"model": "decoded", "messages": [{"role": "user", "content": "Count to ten."}]}
    r = httpx.post(f"{url}/v1/chat/completions", json={**body, **fields}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_the_model_card_names_each_default_and_its_source(
    served: Gateway, config_folder: Path
) -> None:
    card = httpx.get(f"{served.url}/v1/models/decoded").json()
    file = str(config_folder / "generation_config.json")
    assert card["sampling_defaults"] == {
        "temperature": {"value": 0.0, "from": file},
        "repetition_penalty": {"value": 1.0, "from": MODELS_FILE},
        "max_tokens": {"value": 3, "from": file},
    }


def test_requests_take_the_defaults_and_win_over_them_as_under_vllm_serve(
    served: Gateway, default_model_path: Path, config_folder: Path, tmp_path: Path
) -> None:
    left_out = _chat(served.url)
    assert left_out["usage"]["completion_tokens"] == 3  # the generation config's max_new_tokens
    assert left_out["choices"][0]["finish_reason"] == "length"
    assert _chat(served.url, max_tokens=6)["usage"]["completion_tokens"] == 6  # the request's

    # Raw vLLM with the same generation config answers the same left-out request alike
    # (its repetition_penalty, 1.05, is the gateway's models file's 1.0 here: compared
    # with the request setting 1.0, as the models file does).
    spec = raw_vllm(
        default_model_path,
        "decoded",
        2048,
        engine_env(1, {}),
        ["--generation-config", str(config_folder)],
    )
    server = RunningServer(spec, tmp_path / "vllm.log")
    try:
        server.wait_ready("decoded")
        theirs = _chat(spec.base_url, repetition_penalty=1.0)
    finally:
        server.stop()
    assert theirs["usage"]["completion_tokens"] == 3
    text = left_out["choices"][0]["message"]["content"]
    assert theirs["choices"][0]["message"]["content"] == text and text
