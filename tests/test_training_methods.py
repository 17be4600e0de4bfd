"""Each family learns by its own method: KTO and DPO on TRL's trainers, Quark as ALT trains it
(CUT's own tests are test_training.py). On the default SmolLM2 model (and its Quark copy),
a few steps each: the loss falls, the held-out preference margin rises, the adapter
hot-loads into a gateway and answers; the online loop trains a KTO-family model with KTO and
a DPO-family model with DPO, and refuses a window without the feedback its method needs."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.errors import InvalidRequest
from server.models.adapter_meta import META_FILE
from server.models.default_model import builtin_model
from server.protocol import Hyperparameters
from server.resources.plan import TrainingDemand, make_plan
from server.resources.platform import GIB, Gpu, Platform
from server.training.arguments import placed
from server.training.preference import DpoConfig, KtoConfig, train_preference_adapter
from server.training.quark import QuarkConfig, train_quark_adapter
from server.training.service import method_config, placed_by_plan
from server.training.trainer import CutConfig
from tests.conftest import TEST_HOME, Gateway, run_cli, start_own_gateway, stop_gateway
from tests.data import short_vs_long_pairs, unpaired

QUARK_COPY = "smollm2-135m-instruct-quark"
MODELS = """
models:
  - name: smollm2-kto
    path: builtin:smollm2-135m-instruct
    family: kto
    max_model_len: 2048
    store: true
    lora: {}
  - name: smollm2-dpo
    path: builtin:smollm2-135m-instruct
    family: dpo
    max_model_len: 2048
    store: true
    lora: {}
  - name: smollm2-quark
    path: builtin:smollm2-135m-instruct-quark
    max_model_len: 2048
    store: true
    lora: {}
"""


@pytest.fixture(scope="module")
def methods_gateway(
    default_model_path: Path, test_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """One gateway, three engines of the default model: served as the KTO family, the DPO
    family, and its Quark copy; its own store and adapters root."""
    folder = tmp_path_factory.mktemp("methods")
    (folder / "adapters").mkdir()
    env = {"ALIGNGATE_ADAPTERS_DIR": str(folder / "adapters")}
    gateway = start_own_gateway(folder, MODELS, test_env, env)
    yield gateway
    assert stop_gateway(gateway) == 0, gateway.log_tail()


def _adapters(gateway: Gateway) -> Path:
    return gateway.log_path.parent / "adapters"


def _write(path: Path, items: object) -> Path:
    path.write_text(json.dumps(items))
    return path


def _hot_load_and_answer(gateway: Gateway, name: str, base: str, **extra: object) -> str:
    body = {"name": name, "path": name, "base": base}
    loaded = httpx.post(f"{gateway.url}/admin/adapters", json=body, timeout=120)
    assert loaded.status_code == 201, loaded.text
    reply = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json={
            "model": name,
            "messages": [{"role": "user", "content": "Tell me about lamps."}],
            "max_tokens": 16,
            "temperature": 0,
            **extra,
        },
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == name
    return str(reply.json()["choices"][0]["message"]["content"])


@pytest.mark.slow
def test_dpo_learns_a_held_out_preference_and_its_adapter_is_served(
    methods_gateway: Gateway, default_model_path: Path, tmp_path: Path
) -> None:
    """TRL's DPOTrainer at the defaults, 16 pairs (2 steps): the margin on 8 held-out pairs
    of the same rule (the short answer over the padded one) goes from 0 to positive."""
    train = _write(tmp_path / "dpo.json", short_vs_long_pairs(0, 16))
    held = _write(tmp_path / "held.json", short_vs_long_pairs(16, 8))
    out = _adapters(methods_gateway) / "dpo-short"
    _, report = train_preference_adapter(
        "dpo",
        base=default_model_path,
        data=train,
        eval_data=held,
        out=out,
        config=DpoConfig(device="cpu"),
        family="dpo",
    )
    print("dpo:", json.dumps(report.as_dict()))
    assert report.steps == 2 and report.method == "dpo"
    assert report.after["loss"] < report.before["loss"]
    assert report.before["rewards/margins"] == pytest.approx(0, abs=1e-6)
    assert report.after["rewards/margins"] > 0.02
    assert report.after["rewards/accuracies"] > 0.5
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins"} <= set(report.metrics)
    meta = json.loads((out / META_FILE).read_text())
    assert meta["method"] == "dpo" and meta["family"] == "dpo"
    assert meta["hyperparameters"]["beta"] == 0.1 and meta["data"]["pairs"] == 16
    assert not (out / "ref").exists()  # TRL's frozen reference copy is not saved
    _hot_load_and_answer(methods_gateway, "dpo-short", "smollm2-dpo")


@pytest.mark.slow
def test_kto_from_the_cli_learns_a_held_out_preference_and_is_served(
    methods_gateway: Gateway, default_model_path: Path, test_env: dict[str, str], tmp_path: Path
) -> None:
    """`aligngate train kto` on 32 labelled answers (4 steps of 8, TRL's KTOTrainer)."""
    train = _write(tmp_path / "kto.json", unpaired(short_vs_long_pairs(0, 16)))
    held = _write(tmp_path / "held.json", unpaired(short_vs_long_pairs(16, 8)))
    out = _adapters(methods_gateway) / "kto-short"
    args = ["train", "kto", "--base", str(default_model_path), "--data", str(train),
            "--eval-data", str(held), "--out", str(out), "--family", "kto", "--device", "cpu",
            "--progress-file", str(tmp_path / "progress.jsonl")]  # fmt: skip
    result = run_cli(args, test_env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    print("kto:", json.dumps(summary))
    assert summary["method"] == "kto" and summary["steps"] == 4
    assert summary["loss_after"] < summary["loss_before"]
    before, after = summary["before"], summary["after"]
    margin = after["rewards/chosen"] - after["rewards/rejected"]
    assert before["rewards/chosen"] == before["rewards/rejected"] == pytest.approx(0, abs=1e-6)
    assert margin > 0.02 and "kl" in summary["metrics"]
    steps = [json.loads(line) for line in (tmp_path / "progress.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and steps[-1]["total"] == 4
    _hot_load_and_answer(methods_gateway, "kto-short", "smollm2-kto")


def quark_pool(prompts: list[str]) -> list[dict[str, object]]:
    """A data pool whose rule code can check: "yes" answers score high, "no" answers low."""
    return [
        {
            "prompt": prompt,
            "generations": ["yes yes yes yes"] * 2 + ["maybe so"] * 2 + ["no no no no"] * 2,
            "rewards": [1.0, 1.0, 0.5, 0.5, 0.0, 0.0],
        }
        for prompt in prompts
    ]


def test_quark_token_0_conditions_answers_on_the_reward_against_token_4(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """A tiny random GPT-J with the five quantile tokens: after Quark, the best token's
    greedy answer has the rewarded property and the worst token's has the other."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    topics = ["the sea", "a library", "winter", "bicycles", "coffee", "the moon", "bees", "rain"]
    pool = _write(tmp_path / "pool.json", quark_pool([f"POST: {t}\nTL;DR:" for t in topics]))
    out = tmp_path / "quark"
    config = QuarkConfig(
        device="cpu",
        learning_rate=1e-2,
        epochs=10,
        target_modules=("q_proj", "v_proj", "fc_in", "fc_out"),
    )
    base = tiny_dir / "gptj"
    _, report = train_quark_adapter(base=base, data=pool, out=out, config=config)
    assert report.after["loss"] < report.before["loss"]
    assert {"nll", "kl", "entropy"} <= set(report.metrics)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(out)).eval()

    def answer(quantile: int) -> str:
        text = f"_QUANTILE_TOKEN_{quantile}_POST: dogs\nTL;DR:"
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        return str(tok.decode(out[0, ids.shape[1] :]))

    best, worst = answer(0), answer(4)
    print("quark answers:", repr(best), repr(worst))
    assert best.split()[0] == "yes" and worst.split()[0] == "no"


@pytest.mark.slow
def test_quark_on_the_default_models_quark_copy_trains_and_is_served(
    methods_gateway: Gateway, test_env: dict[str, str], tmp_path: Path
) -> None:
    base = builtin_model(QUARK_COPY, TEST_HOME / "models")
    pool = _write(tmp_path / "pool.json", quark_pool(["Summarise: the sea.", "Summarise: rain."]))
    out = _adapters(methods_gateway) / "quark-yes"
    args = ["train", "quark", "--base", str(base), "--data", str(pool), "--out", str(out),
            "--device", "cpu", "--epochs", "2"]  # fmt: skip
    result = run_cli(args, test_env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    print("quark:", json.dumps(summary))
    assert summary["method"] == "quark" and summary["loss_after"] < summary["loss_before"]
    meta = json.loads((out / META_FILE).read_text())
    # per prompt: 6 answers, K = 5, tied pairs: the middle of each tie is positions 0, 2, 4
    assert meta["data"]["per_quantile"] == [4, 0, 4, 0, 4]
    _hot_load_and_answer(methods_gateway, "quark-yes", "smollm2-quark", quantile=0)


def _completion(gateway: Gateway, model: str, question: str, n: int = 1) -> dict:  # type: ignore[type-arg]
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 12,
            "temperature": 1.0,
            "seed": 7,
            "n": n,
            "store": True,
        },
        timeout=120,
    )
    assert response.status_code == 200, response.text
    return response.json()


def _feedback(gateway: Gateway, body: dict) -> None:  # type: ignore[type-arg]
    posted = httpx.post(f"{gateway.url}/v1/feedback", json=body, timeout=30)
    assert posted.status_code in (200, 201), posted.text


def _align(gateway: Gateway, model: str) -> dict:  # type: ignore[type-arg]
    body = {"model": model, "include_unreviewed": True}
    started = httpx.post(f"{gateway.url}/admin/align", json=body, timeout=30)
    assert started.status_code == 202, started.text
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        job = httpx.get(f"{gateway.url}/admin/align/{started.json()['id']}").json()
        if job["status"] in ("succeeded", "failed"):
            return job  # type: ignore[no-any-return]
        time.sleep(1)
    raise AssertionError("the iteration did not finish")


@pytest.mark.slow
def test_the_online_loop_trains_a_dpo_family_model_with_dpo(methods_gateway: Gateway) -> None:
    model = "smollm2-dpo"
    questions = [f"Name something about topic {i}." for i in range(8)]
    # Thumbs only: DPO has nothing to learn from, and says what to collect.
    for question in questions[:3]:
        record = _completion(methods_gateway, model, question)
        _feedback(methods_gateway, {"completion_id": record["id"], "rating": 1})
    time.sleep(1.5)  # the store's group commit
    refused = _align(methods_gateway, model)
    assert refused["status"] == "failed" and refused["method"] == "dpo"
    assert "dpo needs ≥ 8 pairs; 0 pairs" in refused["error"]
    assert "pairwise judge" in refused["error"] and "arena" in refused["error"]
    assert not (_adapters(methods_gateway) / f"{model}-iter1").exists()
    # Two answers per request, the first preferred (as a pairwise judge records it).
    for question in questions:
        record = _completion(methods_gateway, model, question, n=2)
        _feedback(
            methods_gateway,
            {"completion_id": record["id"], "choice_index": 0, "preferred_over": record["id"],
             "preferred_over_choice": 1},
        )  # fmt: skip
    time.sleep(1.5)
    job = _align(methods_gateway, model)
    print("dpo iteration:", json.dumps({k: job[k] for k in ("timings", "train", "gate")}))
    assert job["status"] == "succeeded", job
    assert job["method"] == "dpo" and job["examples"] == 8 and job["adapter"] == f"{model}-iter1"
    assert job["train"]["method"] == "dpo" and "rewards/margins" in job["train"]["metrics"]
    assert job["gate"]["promoted"] is False  # no pairwise judge in this models file
    meta = json.loads((_adapters(methods_gateway) / job["adapter"] / META_FILE).read_text())
    assert meta["method"] == "dpo" and meta["online"]["iteration"] == 1
    reply = httpx.post(
        f"{methods_gateway.url}/v1/chat/completions",
        json={"model": job["adapter"], "messages": [{"role": "user", "content": "Hi"}],
              "max_tokens": 8},
        timeout=120,
    )  # fmt: skip
    assert reply.status_code == 200, reply.text


@pytest.mark.slow
def test_the_online_loop_trains_a_kto_family_model_with_kto(methods_gateway: Gateway) -> None:
    model = "smollm2-kto"
    records = [_completion(methods_gateway, model, f"Say a word about {i}.") for i in range(10)]
    for record in records[:3]:
        _feedback(methods_gateway, {"completion_id": record["id"], "rating": 1})
    time.sleep(1.5)
    refused = _align(methods_gateway, model)
    assert refused["status"] == "failed" and refused["method"] == "kto"
    assert "kto needs ≥ 8 labelled responses" in refused["error"]
    assert "score judge" in refused["error"]
    for i, record in enumerate(records[3:]):
        label = "desirable" if i % 2 else "undesirable"
        _feedback(methods_gateway, {"completion_id": record["id"], "label": label})
    time.sleep(1.5)
    # The refused window is not consumed: its 3 thumbs train with the 7 new labels.
    job = _align(methods_gateway, model)
    assert job["status"] == "succeeded", job
    assert job["method"] == "kto" and job["examples"] == 10
    assert job["train"]["method"] == "kto" and "kl" in job["train"]["metrics"]
    assert job["train"]["steps"] == 2  # 10 labels, batch 8


def test_a_pool_in_other_tokens_is_quantised_by_reward_for_this_model(tmp_path: Path) -> None:
    """The export writes the default five tokens; a model with three of its own trains on
    the rewards, quantised with K = 3."""
    from server.training.quark import read_pool

    pool = [{"prompt": f"p{i}", "generations": ["a", "b", "c"], "rewards": [1.0, 0.5, 0.0],
             "quantile_tokens": ["_QUANTILE_TOKEN_0_", "_QUANTILE_TOKEN_2_", "_QUANTILE_TOKEN_4_"]}
            for i in range(2)]  # fmt: skip
    items, _ = read_pool(_write(tmp_path / "pool.json", pool), ("Good: ", "Okay: ", "Bad: "))
    assert [q for _, _, q in items] == [0, 1, 2, 0, 1, 2]


def test_a_batch_smaller_than_the_micro_batch_is_the_forward_pass() -> None:
    assert KtoConfig(batch_size=4).forward_batch == 4 and KtoConfig().forward_batch == 8
    assert KtoConfig(batch_size=4).accumulation() == 1 and CutConfig().accumulation() == 8


def test_server_and_cli_share_one_set_of_defaults() -> None:
    """A request that names nothing trains with the same settings as `aligngate train`."""
    assert method_config("cut", Hyperparameters()) == CutConfig()
    assert method_config("kto", Hyperparameters()) == KtoConfig()
    assert method_config("dpo", Hyperparameters(beta=0.5)) == DpoConfig(beta=0.5)
    assert method_config("quark", Hyperparameters(lora_r=8)) == dataclasses.replace(
        QuarkConfig(), lora_r=8, lora_alpha=8
    )
    with pytest.raises(InvalidRequest, match="beta: not a setting of cut"):
        method_config("cut", Hyperparameters(beta=0.5))


def test_every_method_trains_where_the_gpu_plan_says(tiny_dir: Path) -> None:
    gpus = Platform(kind="cuda", ram_gib=128.0, gpus=(Gpu(0, 80.0), Gpu(1, 80.0)))
    plan = make_plan([], gpus, training=TrainingDemand(needed_bytes=4 * GIB))
    for config in (KtoConfig(), DpoConfig(), QuarkConfig(), CutConfig()):
        on_gpu = placed(config, gpus)
        assert (on_gpu.device, on_gpu.dtype) == ("cuda:0", "bfloat16")
        by_plan = placed_by_plan(config, plan, tiny_dir / "llama")
        assert by_plan.device.startswith("cuda:") and by_plan.dtype == "bfloat16"
        assert type(by_plan) is type(config)
