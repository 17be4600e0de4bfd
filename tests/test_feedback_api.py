"""Judgments from live traffic: the `openai` client chats, feedback is posted over HTTP,
`aligngate export` writes each training format — checked field by field."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Gateway, run_cli
from tests.test_metrics_and_disconnects import metric

AUSTRALIA = [{"role": "user", "content": "What is the capital of Australia?"}]


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)


def post_feedback(gateway: Gateway, **body: Any) -> httpx.Response:
    return httpx.post(f"{gateway.url}/v1/feedback", json=body, timeout=30)


def stored(gateway: Gateway, completion_id: str) -> dict[str, Any]:
    response = httpx.get(f"{gateway.url}/v1/completions/{completion_id}", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def export(fmt: str, env: dict[str, str], tmp_path: Path, since: float, model: str) -> list:
    out = tmp_path / f"{fmt}.json"
    result = run_cli(
        ["export", "--format", fmt, "--model", model, "--since", str(since), "--out", str(out)],
        env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text())


def test_completions_are_recorded(client: openai.OpenAI, gateway: Gateway) -> None:
    reply = client.chat.completions.create(
        model=gateway.model, messages=AUSTRALIA, temperature=0, max_tokens=24, user="alice"
    )
    record = stored(gateway, reply.id)
    rendered = httpx.post(
        f"{gateway.url}/v1/render",
        json={"model": gateway.model, "messages": AUSTRALIA},
        timeout=30,
    ).json()
    assert record["model"] == gateway.model
    assert record["family"] == "chat"
    assert record["endpoint"] == "chat"
    assert record["request"] == AUSTRALIA
    assert record["prompt_text"] == rendered["text"]
    assert record["template_fingerprint"] == rendered["template_fingerprint"]
    (choice,) = record["choices"]
    assert (choice["index"], choice["text"], choice["finish_reason"]) == (
        0,
        reply.choices[0].message.content,
        reply.choices[0].finish_reason,
    )
    # Token-exact: the ids the engine received and produced, as they were.
    assert record["prompt_token_ids"] == rendered["token_ids"]
    assert len(choice["token_ids"]) == reply.usage.completion_tokens
    assert choice["prompt_token_ids"] is None  # one prompt: the record's
    assert record["usage"] == reply.usage.model_dump(exclude_none=True)
    assert record["sampling"]["temperature"] == 0.0
    assert record["user"] == "alice"
    assert record["latency_ms"] > 0
    assert record["feedback"] == []


def test_streamed_and_text_completions_are_recorded(
    client: openai.OpenAI, gateway: Gateway
) -> None:
    chunks = list(
        client.chat.completions.create(
            model=gateway.model, messages=AUSTRALIA, max_tokens=12, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert stored(gateway, chunks[0].id)["choices"][0]["text"] == text
    completion = client.completions.create(model=gateway.model, prompt=["One", "Two"], max_tokens=3)
    record = stored(gateway, completion.id)
    assert record["endpoint"] == "completions"
    assert [c["text"] for c in record["choices"]] == [c.text for c in completion.choices]


def test_store_false_is_not_recorded(client: openai.OpenAI, gateway: Gateway) -> None:
    reply = client.chat.completions.create(
        model=gateway.model, messages=AUSTRALIA, max_tokens=4, extra_body={"store": False}
    )
    assert httpx.get(f"{gateway.url}/v1/completions/{reply.id}", timeout=30).status_code == 404


def test_feedback_errors(client: openai.OpenAI, gateway: Gateway) -> None:
    reply = client.chat.completions.create(model=gateway.model, messages=AUSTRALIA, max_tokens=4)
    cases = [
        ({"completion_id": "chatcmpl-missing", "rating": 1}, 404, "completion_id"),
        ({"completion_id": reply.id, "judgment": "   "}, 400, "judgment"),
        ({"completion_id": reply.id, "judgment": "x" * 8001}, 400, "judgment"),
        ({"completion_id": reply.id}, 400, None),
        ({"completion_id": reply.id, "rating": 7}, 400, "rating"),
        ({"completion_id": reply.id, "label": "great"}, 400, "label"),
        ({"completion_id": reply.id, "reward": 2e6}, 400, "reward"),
        ({"completion_id": reply.id, "reward": "high"}, 400, "reward"),
        ({"completion_id": reply.id, "choice_index": 3, "rating": 1}, 400, "choice_index"),
        ({"completion_id": reply.id, "preferred_over": "chatcmpl-missing"}, 404, "preferred_over"),
    ]
    for body, status, param in cases:
        response = post_feedback(gateway, **body)
        assert response.status_code == status, (body, response.text)
        assert response.json()["error"]["param"] == param, body


def test_idempotent_feedback(client: openai.OpenAI, gateway: Gateway) -> None:
    reply = client.chat.completions.create(model=gateway.model, messages=AUSTRALIA, max_tokens=4)
    body = {"completion_id": reply.id, "judgment": "Too short.", "idempotency_key": reply.id}
    first = post_feedback(gateway, **body)
    again = post_feedback(gateway, **body)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json() == again.json()
    conflict = post_feedback(gateway, **{**body, "judgment": "Something else."})
    assert conflict.status_code == 422
    assert conflict.json()["error"]["code"] == "idempotency_key_reused"
    assert [f["id"] for f in stored(gateway, reply.id)["feedback"]] == [first.json()["id"]]


def test_feedback_pagination_over_http(client: openai.OpenAI, gateway: Gateway) -> None:
    reply = client.chat.completions.create(model=gateway.model, messages=AUSTRALIA, max_tokens=4)
    since = time.time()
    posted = [
        post_feedback(gateway, completion_id=reply.id, rating=r, rating_scale="stars").json()["id"]
        for r in (1, 2, 3, 4, 5)
    ]
    seen, cursor = [], None
    while True:
        params: dict[str, Any] = {"limit": 2, "since": since, "model": gateway.model}
        if cursor:
            params["after"] = cursor
        page = httpx.get(f"{gateway.url}/v1/feedback", params=params, timeout=30).json()
        seen += [f["id"] for f in page["data"]]
        assert page["has_more"] == (page["next_cursor"] is not None)
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == posted
    newest, cursor = [], None
    while True:
        params = {"limit": 2, "since": since, "model": gateway.model, "order": "desc"}
        page = httpx.get(
            f"{gateway.url}/v1/feedback", params={**params, **({"after": cursor} if cursor else {})}
        ).json()
        newest += [f["id"] for f in page["data"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert newest == posted[::-1]
    bad = httpx.get(f"{gateway.url}/v1/feedback", params={"since": "yesterday"}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "since"


def test_feedback_summary_counts_each_verdict(client: openai.OpenAI, gateway: Gateway) -> None:
    def counts() -> dict[str, int]:
        data = httpx.get(f"{gateway.url}/v1/feedback/summary", timeout=30).json()["data"]
        return next((d for d in data if d["model"] == gateway.model), {})

    before = counts()
    a = client.chat.completions.create(model=gateway.model, messages=AUSTRALIA, max_tokens=4)
    b = client.chat.completions.create(model=gateway.model, messages=AUSTRALIA, max_tokens=4)
    for body in (
        {"judgment": "Wrong city."},  # a judgment alone: undesirable
        {"rating": 3, "rating_scale": "stars"},  # neutral
        {"label": "desirable", "judgment": "Fine, if terse."},
        {"preferred_over": b.id},
    ):
        assert post_feedback(gateway, completion_id=a.id, **body).status_code == 201
    after = counts()
    delta = {k: after[k] - before.get(k, 0) for k in after if k != "model"}
    assert delta == {
        "total": 4,
        "desirable": 1,
        "undesirable": 1,
        "neutral": 2,  # the preference carries no verdict of its own
        "judgments": 2,
        "preferences": 1,
    }


def test_admin_export_over_http_equals_the_cli(
    client: openai.OpenAI, gateway: Gateway, test_env: dict[str, str], tmp_path: Path
) -> None:
    since = time.time()
    reply = client.chat.completions.create(model=gateway.model, messages=AUSTRALIA, max_tokens=8)
    assert post_feedback(gateway, completion_id=reply.id, judgment="Too short.").status_code == 201
    for fmt in ("cut", "kto", "trl-kto", "dpo", "quark"):
        r = httpx.get(
            f"{gateway.url}/admin/export",
            params={"format": fmt, "model": gateway.model, "since": since},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        name = f"aligngate-{fmt}-{gateway.model}.json"
        assert r.headers["content-disposition"] == f'attachment; filename="{name}"'
        assert r.json() == export(fmt, test_env, tmp_path, since, gateway.model)
    bad = httpx.get(f"{gateway.url}/admin/export", params={"format": "csv"}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "format"
    assert httpx.get(f"{gateway.url}/admin/whoami").json() == {"admin": True}


def test_cut_export_end_to_end(
    client: openai.OpenAI, gateway: Gateway, test_env: dict[str, str], tmp_path: Path
) -> None:
    since = time.time()
    before = metric(gateway, "aligngate_feedback_total", model=gateway.model)
    wrong = client.chat.completions.create(
        model=gateway.model,
        messages=[{"role": "user", "content": "Name a prime number."}],
        max_tokens=16,
        temperature=0,
    )
    fine = client.chat.completions.create(
        model=gateway.model, messages=AUSTRALIA, max_tokens=16, temperature=0
    )
    judgment = "Say which number and why it is prime."
    assert post_feedback(gateway, completion_id=wrong.id, judgment=judgment).status_code == 201
    assert post_feedback(gateway, completion_id=fine.id, rating=1).status_code == 201
    assert metric(gateway, "aligngate_feedback_total", model=gateway.model) == before + 2
    items = export("cut", test_env, tmp_path, since, gateway.model)
    for item, reply in zip(items, (wrong, fine), strict=True):
        served = stored(gateway, reply.id)
        assert item["messages"] == served["request"]  # the whole conversation as served
        assert item["prompt_token_ids"] == served["prompt_token_ids"]
        assert item["output_token_ids"] == served["choices"][0]["token_ids"]
    cut_repo_fields = ("id", "instruction", "input", "output", "judgment")
    assert [{k: item[k] for k in cut_repo_fields} for item in items] == [
        {
            "id": 0,
            "instruction": "Name a prime number.",
            "input": "",
            "output": wrong.choices[0].message.content,
            "judgment": judgment,
        },
        {
            "id": 1,
            "instruction": "What is the capital of Australia?",
            "input": "",
            "output": fine.choices[0].message.content,
            "judgment": None,
        },
    ]


def test_kto_exports_end_to_end(
    client: openai.OpenAI, gateway: Gateway, test_env: dict[str, str], tmp_path: Path
) -> None:
    since = time.time()
    reply = client.chat.completions.create(model=gateway.model, messages=AUSTRALIA, max_tokens=8)
    post_feedback(gateway, completion_id=reply.id, label="undesirable")
    prompt_text = stored(gateway, reply.id)["prompt_text"]
    kto = export("kto", test_env, tmp_path, since, gateway.model)
    assert len(kto) == 1
    assert kto[0]["prompt"] == AUSTRALIA
    assert kto[0]["output"] == [{"role": "assistant", "content": reply.choices[0].message.content}]
    assert (kto[0]["label"], kto[0]["reward"], kto[0]["type"]) == (0, 0.0, "binary_feedback")
    assert export("trl-kto", test_env, tmp_path, since, gateway.model) == [
        {"prompt": prompt_text, "completion": reply.choices[0].message.content, "label": False}
    ]


def test_dpo_and_quark_exports_end_to_end(
    client: openai.OpenAI, gateway: Gateway, test_env: dict[str, str], tmp_path: Path
) -> None:
    since = time.time()
    ask = {"model": gateway.model, "messages": AUSTRALIA, "max_tokens": 12, "temperature": 1.0}
    a = client.chat.completions.create(**ask, seed=1)
    b = client.chat.completions.create(**ask, seed=2)
    pair = client.chat.completions.create(**ask, n=2, seed=3)
    assert post_feedback(gateway, completion_id=a.id, preferred_over=b.id).status_code == 201
    post_feedback(gateway, completion_id=pair.id, choice_index=0, rating=2, rating_scale="stars")
    post_feedback(gateway, completion_id=pair.id, choice_index=1, rating=5, rating_scale="stars")
    prompt_text = stored(gateway, a.id)["prompt_text"]
    assert export("dpo", test_env, tmp_path, since, gateway.model) == [
        {
            "prompt": prompt_text,
            "chosen": a.choices[0].message.content,
            "rejected": b.choices[0].message.content,
        },
        {
            "prompt": prompt_text,
            "chosen": pair.choices[1].message.content,
            "rejected": pair.choices[0].message.content,
        },
    ]
    # An explicit reward alone is feedback, shown as sent.
    rewarded = post_feedback(gateway, completion_id=b.id, reward=0.5)
    assert rewarded.status_code == 201 and rewarded.json()["reward"] == 0.5
    quark = export("quark", test_env, tmp_path, since, gateway.model)
    # ALT's data pool, best first: three rewards are fewer than K = 5, so all get the worst.
    assert quark == [
        {
            "prompt": "What is the capital of Australia?",
            "generations": [
                pair.choices[1].message.content,
                b.choices[0].message.content,
                pair.choices[0].message.content,
            ],
            "rewards": [1.0, 0.5, 0.25],
            "quantile_tokens": ["_QUANTILE_TOKEN_4_"] * 3,
            "quantiles": [4, 4, 4],
        },
    ]


def test_store_metrics_move(client: openai.OpenAI, gateway: Gateway) -> None:
    before = metric(gateway, "aligngate_store_writes_total")
    client.chat.completions.create(model=gateway.model, messages=AUSTRALIA, max_tokens=2)
    deadline = time.time() + 5
    while metric(gateway, "aligngate_store_writes_total") <= before and time.time() < deadline:
        time.sleep(0.05)
    assert metric(gateway, "aligngate_store_writes_total") > before
    assert metric(gateway, "aligngate_store_commit_seconds_count") >= 1
    assert metric(gateway, "aligngate_store_errors_total") == 0


def test_exports_filter_by_annotator_key_and_review(
    client: openai.OpenAI, gateway: Gateway, test_env: dict[str, str], tmp_path: Path
) -> None:
    since = time.time()
    reply = client.chat.completions.create(model=gateway.model, messages=AUSTRALIA, max_tokens=8)
    ids = {}
    for who in ("ana", "bo"):
        r = post_feedback(gateway, completion_id=reply.id, judgment=f"{who}: wrong.", annotator=who)
        assert r.status_code == 201 and r.json()["key_id"] == "loopback"
        ids[who] = r.json()["id"]
    review = {"ids": [ids["bo"]]}
    assert httpx.post(f"{gateway.url}/admin/feedback/review", json=review).status_code == 200

    def cli(*flags: str) -> list[str]:
        out = tmp_path / "cut.json"
        args = ["export", "--format", "cut", "--since", str(since), "--out", str(out), *flags]
        done = run_cli(args, test_env)
        assert done.returncode == 0, done.stderr
        return [i["judgment"] for i in json.loads(out.read_text())]

    def http(**params: Any) -> list[str]:
        r = httpx.get(
            f"{gateway.url}/admin/export",
            params={"format": "cut", "since": since, **params},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        return [i["judgment"] for i in r.json()]

    # Two verdicts on one choice: the latest (bo's) wins, counted as superseded and conflicting.
    assert cli() == http() == ["bo: wrong."]
    r = httpx.get(
        f"{gateway.url}/admin/export", params={"format": "cut", "since": since}, timeout=30
    )
    assert r.headers["x-aligngate-export-superseded"] == "1"
    assert r.headers["x-aligngate-export-conflicts"] == "1"
    # Filters select first; the rule then applies to what they selected.
    assert cli("--annotator", "ana") == http(annotator="ana") == ["ana: wrong."]
    assert cli("--reviewed") == http(reviewed_only=True) == ["bo: wrong."]
    assert cli("--key-id", "loopback") == http(key_id="loopback") == cli()
    assert cli("--key-id", "key-someone-else") == http(key_id="key-someone-else") == []
    listed = httpx.get(f"{gateway.url}/v1/feedback", params={"since": since}, timeout=30).json()[
        "data"
    ]
    assert {f["annotator"]: f["reviewed"] for f in listed} == {"ana": False, "bo": True}


def test_several_prompts_are_recorded_each_and_pairs_never_mix_them(
    client: openai.OpenAI, gateway: Gateway, test_env: dict[str, str], tmp_path: Path
) -> None:
    """A /v1/completions call with two prompts records each choice's own prompt (text and
    ids); a preference names its losing choice and must stay within one prompt."""
    since = time.time()
    prompts = ["The capital of France is", "The largest planet is"]
    reply = client.completions.create(
        model=gateway.model, prompt=prompts, n=2, max_tokens=6, temperature=1.0, seed=4
    )
    record = stored(gateway, reply.id)
    assert [c["prompt_text"] for c in record["choices"]] == [p for p in prompts for _ in "ab"]
    for choice in record["choices"]:
        rendered = httpx.post(
            f"{gateway.url}/v1/render",
            json={"model": gateway.model, "prompt": choice["prompt_text"]},
            timeout=30,
        ).json()
        assert choice["prompt_token_ids"] == rendered["token_ids"]
    mixed = post_feedback(
        gateway,
        completion_id=reply.id,
        choice_index=0,
        preferred_over=reply.id,
        preferred_over_choice=2,
    )
    assert mixed.status_code == 400 and mixed.json()["error"]["param"] == "preferred_over"
    ok = post_feedback(
        gateway,
        completion_id=reply.id,
        choice_index=3,
        preferred_over=reply.id,
        preferred_over_choice=2,
    )
    assert ok.status_code == 201 and ok.json()["preferred_over_choice"] == 2
    assert export("dpo", test_env, tmp_path, since, gateway.model) == [
        {
            "prompt": prompts[1],
            "chosen": reply.choices[3].text,
            "rejected": reply.choices[2].text,
        }
    ]


def test_exports_keep_the_whole_conversation(
    client: openai.OpenAI, gateway: Gateway, test_env: dict[str, str], tmp_path: Path
) -> None:
    since = time.time()
    conversation = [
        {"role": "system", "content": "Answer in one short sentence."},
        {"role": "user", "content": "What is the capital of Italy?"},
        {"role": "assistant", "content": "The capital of Italy is Rome."},
        {"role": "user", "content": "And of France?"},
    ]
    reply = client.chat.completions.create(
        model=gateway.model, messages=conversation, max_tokens=12, temperature=0
    )
    post_feedback(gateway, completion_id=reply.id, judgment="Name the city first.")
    (cut,) = export("cut", test_env, tmp_path, since, gateway.model)
    assert cut["messages"] == conversation and cut["instruction"] == "And of France?"
    (kto,) = export("kto", test_env, tmp_path, since, gateway.model)
    assert kto["prompt"] == conversation
