"""docs/coming-from-vllm.md is what docs/gen_coming_from_vllm.py writes from the installed
vLLM and the gateway's code: a vLLM upgrade or a new request field shows up as a diff."""

from __future__ import annotations

import importlib.util
from pathlib import Path

GENERATOR = Path(__file__).resolve().parents[1] / "docs" / "gen_coming_from_vllm.py"


def test_the_coming_from_vllm_page_is_current() -> None:
    spec = importlib.util.spec_from_file_location("gen_coming_from_vllm", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = module.PAGE.read_text()
    assert written == module.render(), (
        "docs/coming-from-vllm.md is stale: run `.venv/bin/python docs/gen_coming_from_vllm.py`"
    )
    # Every vLLM request field and engine argument has a row.
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    for name in ChatCompletionRequest.model_fields:
        assert f"| `{name}` |" in written, name
    assert f"| `{AsyncEngineArgs.__dataclass_fields__['max_num_seqs'].name}` |" in written
