"""``aligngate serve [MODEL] [vLLM engine flags]`` (issue 31, item 1): one model from a
folder, no models file; engine flags parsed by vLLM's own parser, so each means what it
means to `vllm serve`; `--served-model-name`, `--api-key` / ALIGNGATE_API_KEY; a models
file beside MODEL or engine flags is an error; `vllm serve`'s server flags the gateway does
not take say what it does instead."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from server.cli.serve_command import parse_serve_args, serve_deployment
from server.models.models_file import DEFAULT_MODEL_NAME, ModelsFileError
from server.settings import Settings
from tests.conftest import REPO, Gateway, run_cli
from tests.conftest import SERVED_FOLDER_KEY as KEY

HEADER = "x-aligngate-ignored-fields"


def _entry(argv: list[str], settings: Settings | None = None):  # type: ignore[no-untyped-def]
    deployment = serve_deployment(parse_serve_args(argv), settings or Settings(config=None))
    assert len(deployment.models) == 1
    return deployment.models[0]


def test_engine_flags_keep_vllms_meaning(default_model_path: Path) -> None:
    from vllm.engine.arg_utils import EngineArgs

    folder = str(default_model_path)
    entry = _entry([folder, "--max-model-len", "2k", "--served-model-name", "tiny"])
    # vLLM's human-readable sizes: 2k is 2000 (2K would be 2048).
    assert (entry.name, entry.path, entry.max_model_len) == ("tiny", folder, 2000)
    assert entry.lora is None and entry.engine_args == {}  # vllm serve's defaults: no LoRA

    entry = _entry(
        [
            folder,
            "--enable-lora",
            "--max-lora-rank",
            "8",
            "--dtype",
            "float32",
            "--enforce-eager",
            "--max-num-seqs",
            "4",
            "--override-generation-config",
            '{"temperature": 0.3, "max_new_tokens": 40}',
            "--compilation-config.mode",
            "0",
        ]
    )
    assert entry.name == default_model_path.name  # a path is not a name: the folder's
    assert entry.dtype == "float32"
    # --enable-lora's sizes left out are vLLM's own defaults, not the gateway's.
    assert entry.lora is not None and entry.lora.max_rank == 8
    assert entry.lora.max_loras == EngineArgs.max_loras
    assert entry.sampling.temperature == 0.3 and entry.sampling.max_tokens == 40
    assert entry.engine_args["enforce_eager"] is True and entry.engine_args["max_num_seqs"] == 4
    assert entry.engine_args["compilation_config"].mode == 0  # vLLM's CompilationConfig
    # A flag given with vLLM's default value still counts: the gateway's defaults differ
    # (eager mode on a CPU, the resource plan's memory share).
    entry = _entry([folder, "--no-enforce-eager", "--gpu-memory-utilization", "0.9"])
    assert entry.engine_args == {"enforce_eager": False}
    assert entry.gpu_memory_utilization == 0.9
    assert {"model", "served_model_name", "dtype", "enable_lora"}.isdisjoint(entry.engine_args)


def test_no_model_serves_the_embedded_one_with_the_flags() -> None:
    entry = _entry(["--max-model-len", "4096"])
    assert (entry.name, entry.max_model_len) == (DEFAULT_MODEL_NAME, 4096)
    assert entry.lora is not None  # the embedded model keeps LoRA on, for `aligngate align`
    assert _entry([]).max_model_len == 8192


def test_a_models_file_beside_a_model_or_engine_flags_is_an_error(
    default_model_path: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models.yaml"
    models.write_text("models: []\n")
    with pytest.raises(ModelsFileError, match=r"MODEL: a models file \(--config"):
        _entry([str(default_model_path), "--config", str(models)])
    with pytest.raises(ModelsFileError, match=r"--max-model-len: a models file \(ALIGNGATE_CONF"):
        _entry(["--max-model-len", "2048"], Settings(config=models))
    with pytest.raises(ModelsFileError, match=r"not a folder.*nothing is downloaded"):
        _entry(["Qwen/Qwen3-0.6B"])
    with pytest.raises(ModelsFileError, match=r"--tool-call-parser: a models file"):
        _entry(["--tool-call-parser", "hermes"], Settings(config=models))


def test_tool_flags_are_vllms(default_model_path: Path) -> None:
    folder = str(default_model_path)
    entry = _entry([folder, "--tool-call-parser", "hermes", "--enable-auto-tool-choice"])
    assert (entry.tool_call_parser, entry.enable_auto_tool_choice) == ("hermes", True)
    assert entry.path == folder and entry.name == default_model_path.name
    with pytest.raises(ModelsFileError, match=r"unknown tool_call_parser 'hermes3'.*hermes"):
        _entry([folder, "--tool-call-parser", "hermes3"])
    with pytest.raises(ModelsFileError, match="needs tool_call_parser"):
        _entry([folder, "--enable-auto-tool-choice"])


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The serve parser's refusal of ``argv``: exit 2 and what it says on stderr."""
    with pytest.raises(SystemExit) as exit_:
        parse_serve_args(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_bad_flags_are_refused_before_anything_starts(
    test_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    said = _refused(["--chat-template", "x.jinja"], capsys)
    assert "--chat-template is a `vllm serve` server flag; in aligngate: the models file's " in said
    assert "--max-model-len" in _refused(["--max-model-len", "lots"], capsys)
    # --api-key takes one or more keys (vLLM's): a folder after it was meant as MODEL.
    assert "give MODEL first" in _refused(["--api-key", "k" * 16, str(REPO / "templates")], capsys)
    with pytest.raises(ModelsFileError, match="give one name"):
        _entry(["--served-model-name", "a", "b"])
    # One setting sizes a CPU engine's KV cache; vLLM's variable beside it must agree. A
    # process of its own: the variable is read as the process starts.
    env = {**test_env, "VLLM_CPU_KVCACHE_SPACE": "4", "ALIGNGATE_CPU_KV_CACHE_GIB": "1"}
    done = run_cli(["serve"], env, timeout=120)
    assert done.returncode == 2 and "ALIGNGATE_CPU_KV_CACHE_GIB=1 disagree" in done.stderr


def test_the_api_key_setting_joins_the_keys() -> None:
    settings = Settings(api_keys=None, api_key=KEY)
    assert settings.inline_api_keys() == KEY
    both = Settings(api_keys="a" * 16, api_key=KEY)
    assert both.inline_api_keys() == f"{'a' * 16},{KEY}"


def test_serve_model_answers_the_openai_sdk_and_langchain(served_folder: Gateway) -> None:
    from langchain_openai import ChatOpenAI

    assert httpx.get(f"{served_folder.url}/v1/models", timeout=30).status_code == 401  # --api-key
    client = openai.OpenAI(base_url=f"{served_folder.url}/v1", api_key=KEY, max_retries=0)
    models = {m.id: m for m in client.models.list().data}  # with its `tiny@latest` alias
    assert models["tiny"].max_model_len == 2048  # type: ignore[attr-defined]
    raw = client.chat.completions.with_raw_response.create(
        model="tiny",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12,
        temperature=0,
        extra_body={"vendor_option": 1},
    )
    assert raw.headers[HEADER] == "vendor_option"  # unknown fields: 200, named
    assert "Paris" in (raw.parse().choices[0].message.content or "")
    chat = ChatOpenAI(
        model="tiny",
        base_url=f"{served_folder.url}/v1",
        api_key=KEY,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=12,  # type: ignore[call-arg]
        max_retries=0,
    )
    assert "Paris" in str(chat.invoke("What is the capital of France?").content)
    # The engine's context is the flag's: a 2,100-token prompt does not fit.
    long = client.completions.with_raw_response.create
    with pytest.raises(openai.BadRequestError, match="maximum context length is 2048"):
        long(model="tiny", prompt="hello " * 2100, max_tokens=1)


def test_litellm_openai_compatible_provider(served_folder: Gateway) -> None:
    """LiteLLM's `openai/` provider, as its users point it at a vLLM server."""
    import os

    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download at import
    import litellm

    request = {
        "model": "openai/tiny",
        "api_base": f"{served_folder.url}/v1",
        "api_key": KEY,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 12,
        "temperature": 0,
    }
    reply = litellm.completion(**request)
    assert "Paris" in (reply.choices[0].message.content or "")  # type: ignore[union-attr]
    streamed = litellm.completion(**request, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed)  # type: ignore[union-attr]
    assert text == reply.choices[0].message.content  # type: ignore[union-attr]
