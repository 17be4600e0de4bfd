"""examples/families.yaml: the real default model served under all four families at once."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.conftest import REPO, Gateway, start_gateway, stop_gateway

FAMILIES = {
    "smollm2-cut": ("cut", "### Instruction:\nWhat is the capital of France?\n\n### Response:\n"),
    "smollm2-kto": ("kto", "<|user|>\nWhat is the capital of France?\n<|assistant|>\n"),
    "smollm2-dpo": ("dpo", "<|im_start|>system\n你是一个有用的人工智能助手。<|im_end|>\n"),
    "smollm2-quark": ("quark", "_QUANTILE_TOKEN_0_What is the capital of France?"),
}


@pytest.fixture(scope="module")
def examples_gateway(
    test_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    log_path = tmp_path_factory.mktemp("examples-gateway") / "serve.log"
    gw = start_gateway(["--config", str(REPO / "examples" / "families.yaml")], log_path, test_env)
    yield gw
    assert stop_gateway(gw) == 0, gw.log_tail()


@pytest.mark.slow
def test_four_families_answer_from_one_process(examples_gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=f"{examples_gateway.url}/v1", api_key="unused", max_retries=0)
    listed = [m.model_dump() for m in client.models.list().data]
    cards = {m["id"]: m for m in listed if not m.get("alias_of")}  # NAME@latest: aliases
    assert {m["id"] for m in listed if m.get("alias_of")} == {f"{n}@latest" for n in FAMILIES}
    assert {name: card["family"] for name, card in cards.items()} == {
        name: family for name, (family, _) in FAMILIES.items()
    }
    question = [{"role": "user", "content": "What is the capital of France?"}]
    for name, (_, rendered) in FAMILIES.items():
        render = client.post("/render", body={"model": name, "messages": question}, cast_to=object)
        assert rendered in render["text"]
        reply = client.chat.completions.create(
            model=name, messages=question, temperature=0, max_tokens=24
        )
        # (The quark copy's new token rows are untrained: it may answer with EOS at once.)
        assert reply.usage.completion_tokens >= 1, name
        assert reply.choices[0].finish_reason in ("stop", "length"), name
    # The Alpaca-format prompt still gets the real model to the right answer.
    cut = client.chat.completions.create(
        model="smollm2-cut", messages=question, temperature=0, max_tokens=24
    )
    assert "Paris" in cut.choices[0].message.content
