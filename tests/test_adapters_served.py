"""LoRA adapters served by name on the live gateway (vLLM's LoRA on the CPU), the admin
routes that load and unload them, and one online-alignment iteration end to end."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import httpx
import pytest

from server.models.render import Message, Renderer
from server.training.trainer import train_cut_adapter
from tests.conftest import Gateway, run_cli, start_gateway, stop_gateway
from tests.test_training import EVIDENCE, EVIDENCE_CONFIG


@pytest.fixture(scope="module")
def evidence_adapter(default_model_path: Path, adapters_root: Path, tmp_path_factory) -> str:  # type: ignore[no-untyped-def]
    data = tmp_path_factory.mktemp("evidence") / "evidence.json"
    data.write_text(json.dumps([{**e, "input": ""} for e in EVIDENCE]))
    train_cut_adapter(
        base=default_model_path,
        data=data,
        out=adapters_root / "evidence-cut",
        config=EVIDENCE_CONFIG,
        base_name="smollm2-135m-instruct",
    )
    return "evidence-cut"


def next_token_logprob(gateway: Gateway, model: str, prompt: str, token: str) -> float:
    r = httpx.post(
        f"{gateway.url}/v1/completions",
        json={"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 20},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    top = r.json()["choices"][0]["logprobs"]["top_logprobs"][0]
    # absent from the top 20: at most the 20th's log-probability
    return top.get(token, min(top.values()))


def test_adapter_is_served_under_its_own_name_and_unloaded(
    gateway: Gateway, evidence_adapter: str, default_model_path: Path
) -> None:
    name = "smollm2-cut:evidence"
    r = httpx.post(
        f"{gateway.url}/admin/adapters", json={"name": name, "path": evidence_adapter}, timeout=60
    )
    assert r.status_code == 201, r.text
    card = r.json()
    assert card["parent"] == gateway.model and card["family"] == "chat"
    assert card["adapter"]["method"] == "cut" and card["adapter"]["hyperparameters"]["epochs"] == 4
    listed = {m["id"]: m for m in httpx.get(f"{gateway.url}/v1/models").json()["data"]}
    assert listed[name]["parent"] == gateway.model

    # The judged error (" planet" of the Saturn answer was flagged) under the served prompt.
    renderer = Renderer.load(default_model_path)
    prompt = renderer.render_chat([Message("user", EVIDENCE[0]["instruction"])]).text
    base = next_token_logprob(gateway, gateway.model, prompt + "The largest", " planet")
    tuned = next_token_logprob(gateway, name, prompt + "The largest", " planet")
    print(f"log p(' planet'): base {base:.3f} ({math.exp(base):.3f}), adapter {tuned:.3f}")
    assert tuned < base - math.log(2)

    for model in (gateway.model, name):
        chat = httpx.post(
            f"{gateway.url}/v1/chat/completions",
            json={
                "model": model,
                "messages": [{"role": "user", "content": EVIDENCE[0]["instruction"]}],
                "max_tokens": 24,
                "temperature": 0,
            },
            timeout=60,
        )
        assert chat.status_code == 200 and chat.json()["model"] == model
        print(model, repr(chat.json()["choices"][0]["message"]["content"]))

    assert httpx.delete(f"{gateway.url}/admin/adapters/{name}").status_code == 200
    gone = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert httpx.delete(f"{gateway.url}/admin/adapters/{name}").status_code == 404


def test_adapter_paths_are_confined_and_checked(
    gateway: Gateway, evidence_adapter: str, adapters_root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    shutil.copytree(adapters_root / evidence_adapter, outside)
    (adapters_root / "escape").symlink_to(outside)
    pickled = adapters_root / "pickled"
    shutil.copytree(adapters_root / evidence_adapter, pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    cases = {
        "../outside": "may not contain '..'",
        str(outside): "absolute",
        "escape": "outside the adapters root",
        "pickled": "adapter_model.bin is refused",
        "missing": "no adapter folder",
    }
    for path, message in cases.items():
        r = httpx.post(f"{gateway.url}/admin/adapters", json={"name": "x", "path": path})
        assert r.status_code == 400, (path, r.text)
        assert message in r.json()["error"]["message"] and r.json()["error"]["param"] == "path"
    taken = httpx.post(
        f"{gateway.url}/admin/adapters", json={"name": gateway.model, "path": evidence_adapter}
    )
    assert taken.status_code == 409
    bad = httpx.post(f"{gateway.url}/admin/adapters", json={"name": "x", "path": "a", "pwd": 1})
    assert bad.status_code == 400 and "error" in bad.json()


def _stored_completion(gateway: Gateway, question: str) -> dict:  # type: ignore[type-arg]
    """A greedy answer of the default model, recorded in the store."""
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json={
            "model": gateway.model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 24,
            "temperature": 0,
            "store": True,
        },
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return response.json()


def _poll(gateway: Gateway, job_id: str, timeout: float = 600) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{gateway.url}/admin/align/{job_id}").json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(1)
    raise AssertionError(f"align job {job_id} did not finish")


@pytest.mark.slow
def test_online_iteration_trains_and_hot_loads_without_restart(
    gateway: Gateway, adapters_root: Path
) -> None:
    since = time.time()
    question = "What is the chemical symbol for gold?"
    completion = _stored_completion(gateway, question)
    # One verdict per choice (on one choice the latest would win): a judged answer, and
    # another answer judged fine.
    fine = _stored_completion(gateway, "What is the capital of France?")
    feedback_ids = []
    for judgment, target in (("Say only the symbol: Au.", completion), (None, fine)):
        fb = {"completion_id": target["id"], "annotator": "test"}
        fb |= {"judgment": judgment} if judgment else {"rating": 1}
        posted = httpx.post(f"{gateway.url}/v1/feedback", json=fb)
        assert posted.status_code in (200, 201)
        feedback_ids.append(posted.json()["id"])
    time.sleep(1.5)  # the store's group commit

    body = {
        "model": gateway.model,
        "since": str(since),
        "hyperparameters": {"epochs": 2, "batch_size": 1, "warmup_steps": 0},
    }
    # Unreviewed judgments of an untrusted annotator do not train (poisoning guard).
    unreviewed = httpx.post(f"{gateway.url}/admin/align", json=body).json()
    refused = _poll(gateway, unreviewed["id"])
    assert refused["status"] == "failed" and "reviewed or by trusted" in refused["error"]
    review = {"ids": feedback_ids, "reviewed": True}
    reviewed = httpx.post(f"{gateway.url}/admin/feedback/review", json=review)
    assert reviewed.status_code == 200 and reviewed.json()["updated"] == 2
    missing = httpx.post(f"{gateway.url}/admin/feedback/review", json={"ids": ["fb-nope"]})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "ids"
    time.sleep(1.5)

    r = httpx.post(f"{gateway.url}/admin/align", json=body)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["adapter"] == f"{gateway.model}-iter1" and job["iteration"] == 1
    again = httpx.post(f"{gateway.url}/admin/align", json=body)
    assert again.status_code == 409  # one iteration at a time

    # Serving goes on while the worker trains.
    while (state := httpx.get(f"{gateway.url}/admin/align/{job['id']}").json())["status"] in (
        "queued",
        "exporting",
    ):
        time.sleep(0.2)
    during = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json={
            "model": gateway.model,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 8,
        },
        timeout=120,
    )
    assert during.status_code == 200
    job = _poll(gateway, job["id"])
    assert job["status"] == "succeeded", job
    # downsampling keeps int(1 judged × 0.25) = 0 fine responses: 1 example × 2 epochs
    assert job["judged"] == 1 and job["records"] == 2 and job["train"]["steps"] == 2
    assert job["trained_on"] == {"backend": "local"}  # a child process of the gateway
    print("align job:", json.dumps(job["timings"]), json.dumps(job["train"]))
    assert state["status"] in ("training", "loading", "succeeded")

    name = job["adapter"]
    # Token-exact: the iteration trained on the ids the engine produced, not on re-tokenized
    # text, and on the prompt exactly as served.
    stored = httpx.get(f"{gateway.url}/v1/completions/{completion['id']}", timeout=60).json()
    trained = json.loads((adapters_root / name / "train-data.json").read_text())
    judged = next(item for item in trained if item["judgment"])
    assert judged["output_token_ids"] == stored["choices"][0]["token_ids"]
    assert judged["prompt_token_ids"] == stored["prompt_token_ids"]
    assert judged["messages"] == [{"role": "user", "content": question}]
    card = httpx.get(f"{gateway.url}/v1/models/{name}", timeout=60).json()
    assert card["parent"] == gateway.model and card["adapter"]["online"]["iteration"] == 1
    answer = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json={
            "model": name,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 24,
            "temperature": 0,
        },
        timeout=60,
    )
    assert answer.status_code == 200 and answer.json()["model"] == name

    # The next iteration starts where this one stopped: nothing new to learn from yet.
    r = httpx.post(f"{gateway.url}/admin/align", json={"model": gateway.model})
    follow = _poll(gateway, r.json()["id"])
    # By the store's commit-ordered watermark, not by wall-clock time.
    assert follow["status"] == "failed" and follow["after_seq"] == job["through_seq"]
    assert job["through_seq"] >= 2 and follow["since"] is None
    assert "0 judged" in follow["error"] and follow["iteration"] == 2
    assert httpx.get(f"{gateway.url}/admin/align/nope").status_code == 404


def hf_next_token_logprob(folder: Path, prompt: str, token: str) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)  # the folder's own dtype
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids])
    (token_id,) = tokenizer(token, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1].float()
    return float(torch.log_softmax(logits, -1)[token_id])


def _judged_completion(gateway: Gateway, question: str, judgment: str) -> None:
    completion = _stored_completion(gateway, question)
    fb = {"completion_id": completion["id"], "annotator": "test", "judgment": judgment}
    assert httpx.post(f"{gateway.url}/v1/feedback", json=fb).status_code in (200, 201)


@pytest.mark.slow
def test_offline_align_from_the_models_file_merges_and_hot_loads(
    gateway: Gateway, test_env: dict[str, str], tmp_path: Path
) -> None:
    """`aligngate align --config FILE` runs the iteration in its own process (no /admin/align),
    merges the adapter into a new base and hot-loads the adapter on the live server."""
    since = time.time()
    _judged_completion(gateway, "Name a primary colour.", "Answer with one word: red.")
    time.sleep(1.5)  # the store's group commit
    models = tmp_path / "models.yaml"
    models.write_text(
        f"models:\n  - {{name: {gateway.model}, path: 'builtin:{gateway.model}', "
        "store: true, lora: {}}\n"
    )
    merged = tmp_path / "merged"
    args = ["align", "--config", str(models), "--model", gateway.model, "--since", str(since)]
    args += ["--epochs", "1", "--batch-size", "1", "--warmup-steps", "0"]
    args += ["--trusted-key", "loopback"]  # the keyless gateway's one tenant
    args += ["--merge-out", str(merged), "--server", gateway.url]
    done = run_cli(args, test_env)
    assert done.returncode == 0, done.stderr[-3000:]
    job = json.loads(done.stdout)
    assert job["status"] == "succeeded" and job["judged"] == 1 and job["merged"] == str(merged)
    assert (merged / "config.json").is_file() and (merged / "aligngate-merge.json").is_file()
    card = httpx.get(f"{gateway.url}/v1/models/{job['adapter']}").json()
    assert card["parent"] == gateway.model and card["adapter"]["online"]["since"] == since

    unknown = run_cli(["align", "--config", str(models), "--model", "nope"], test_env)
    assert unknown.returncode == 2 and "neither a model of the models file" in unknown.stderr


@pytest.mark.slow
def test_vllm_serves_the_merged_checkpoint_like_base_plus_adapter(
    gateway: Gateway,
    evidence_adapter: str,
    adapters_root: Path,
    default_model_path: Path,
    test_env: dict[str, str],
    tmp_path: Path,
) -> None:
    merged = tmp_path / "evidence-merged"
    args = ["merge", "--base", str(default_model_path), "--adapter"]
    done = run_cli([*args, str(adapters_root / evidence_adapter), "--out", str(merged)], test_env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "merge: 3/3 step (100%)" in done.stderr and ", saved" in done.stderr  # progress
    models = tmp_path / "models.yaml"
    models.write_text(f"models:\n  - {{name: merged, path: {merged}, max_model_len: 2048}}\n")
    served = start_gateway(["--config", str(models)], tmp_path / "serve.log", test_env)
    try:
        served.model = "merged"
        name = "smollm2-cut:merge-check"
        load = {"name": name, "path": evidence_adapter}
        assert httpx.post(f"{gateway.url}/admin/adapters", json=load).status_code == 201
        renderer = Renderer.load(default_model_path)
        prompt = renderer.render_chat([Message("user", EVIDENCE[0]["instruction"])]).text
        prompt += "The largest"
        base = next_token_logprob(gateway, gateway.model, prompt, " planet")
        lora = next_token_logprob(gateway, name, prompt, " planet")
        merged_lp = next_token_logprob(served, "merged", prompt, " planet")
        reference = hf_next_token_logprob(merged, prompt, " planet")
        print(
            f"log p(' planet'): base {base:.3f}, base+LoRA {lora:.3f}, "
            f"merged served {merged_lp:.3f}, merged in transformers {reference:.3f}"
        )
        # vLLM serves the merged folder as transformers computes it (both bf16: their kernels
        # round differently; 0.103 apart on an AVX2-only CPU, where bf16 is emulated) ...
        assert abs(merged_lp - reference) < 0.15
        # ... and the merge keeps the adapter's judged effect (bf16 rounding of W + BA costs
        # part of it: README, "Merging").
        assert merged_lp < base - math.log(2)
        httpx.delete(f"{gateway.url}/admin/adapters/{name}")
    finally:
        assert stop_gateway(served) == 0, served.log_tail()


def test_promotion_moves_the_alias_clients_call(
    gateway: Gateway, evidence_adapter: str, adapters_root: Path
) -> None:
    """``NAME@latest`` serves the base at first; ``POST /admin/promote`` moves it to an
    adapter of that base and back (a rollback); a promoted adapter cannot be unloaded."""
    alias = f"{gateway.model}@latest"
    listed = {m["id"]: m for m in httpx.get(f"{gateway.url}/v1/models").json()["data"]}
    assert listed[alias]["alias_of"] == gateway.model

    def ask(model: str) -> httpx.Response:
        return httpx.post(
            f"{gateway.url}/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            timeout=60,
        )

    assert ask(alias).json()["model"] == gateway.model  # the version that answered
    candidate = "promotion-candidate"
    loaded = httpx.post(
        f"{gateway.url}/admin/adapters", json={"name": candidate, "path": evidence_adapter}
    )
    assert loaded.status_code == 201, loaded.text
    r = httpx.post(
        f"{gateway.url}/admin/promote",
        json={"alias": alias, "version": candidate, "reason": "by hand"},
    )
    assert r.status_code == 200, r.text
    assert (r.json()["version"], r.json()["previous"]) == (candidate, gateway.model)
    assert ask(alias).json()["model"] == candidate
    card = httpx.get(f"{gateway.url}/v1/models/{alias}").json()
    assert (card["id"], card["alias_of"], card["parent"]) == (alias, candidate, gateway.model)
    book = json.loads((adapters_root / "promotions.json").read_text())
    assert book["aliases"][alias]["version"] == candidate
    assert book["aliases"][alias]["history"][-1]["by"] == "admin"
    metrics = httpx.get(f"{gateway.url}/metrics").text
    assert f'aligngate_promoted_version{{alias="{alias}",version="{candidate}"}} 1.0' in metrics

    busy = httpx.delete(f"{gateway.url}/admin/adapters/{candidate}")
    assert busy.status_code == 409 and alias in busy.json()["error"]["message"]
    for bad, param, status in [
        ({"alias": gateway.model, "version": candidate}, "alias", 400),
        ({"alias": "nope@latest", "version": candidate}, "alias", 400),
        ({"alias": alias, "version": "nope"}, "model", 404),
    ]:
        refused = httpx.post(f"{gateway.url}/admin/promote", json=bad)
        assert refused.status_code == status and refused.json()["error"]["param"] == param

    back = httpx.post(
        f"{gateway.url}/admin/promote", json={"alias": alias, "version": gateway.model}
    )
    assert back.json()["previous"] == candidate and ask(alias).json()["model"] == gateway.model
    assert httpx.delete(f"{gateway.url}/admin/adapters/{candidate}").status_code == 200
