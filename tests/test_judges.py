"""AI judges: parsing real replies, the models file's `judges:` section, verdicts in the store,
and the gateway's own default model as the judge — a real endpoint whose verdicts may be poor,
but whose plumbing, storage, parsing, order swap and counting are real."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from server.evaluation.judge_prompts import (
    JudgePrompt,
    JudgeReplyError,
    parse_judgment,
    parse_pair,
    parse_score,
    reply_pattern,
)
from server.evaluation.judge_runs import judge_stored, store_pair_verdict, store_verdict
from server.evaluation.judges import PairVerdict, Verdict, build_judge, compare
from server.metrics import JudgeMetrics
from server.models.models_file import JudgeEntry, ModelsFileError, load_deployment
from server.store import ChoiceRecord, CompletionRecord, Store
from tests.conftest import Gateway, run_cli, start_own_gateway, stop_gateway
from tests.data import EVAL_SET, real_file

# --- Parsing: real replies of each kind -----------------------------------------------------

SCORE_REPLY = (
    "The response correctly names Canberra as the capital and adds a relevant detail about "
    "its founding. It is concise and accurate.\n\nRating: [[8]]"
)
JUDGMENT_BAD = (
    "The response claims that the capital of Australia is Sydney. This is wrong: the capital "
    "is Canberra. It also ignores the request to answer in one word.\n\nVerdict: [[BAD]]"
)
JUDGMENT_GOOD = "The response answers the question correctly and concisely.\n\nVerdict: [[GOOD]]"
PAIR_A = (
    "Assistant A gives the correct capital, while Assistant B names Sydney, which is wrong. [[A]]"
)


def test_score_replies_parse_strictly() -> None:
    assert parse_score(SCORE_REPLY) == 8
    assert parse_score("Rating: [[ 6.5 ]]") == 6.5
    assert parse_score("I'd give it [[7]]. Final: Rating: [[7]]") == 7  # the same value twice
    for reply, reason in [
        ("The answer is good. Rating: 8/10", "no_marker"),  # MT-Bench's lenient [8] is refused
        ("Rating: [8]", "no_marker"),
        ("Rating: [[7]] ... on reflection, Rating: [[4]]", "ambiguous"),
        ("Rating: [[11]]", "out_of_range"),
        ("Rating: [[0]]", "out_of_range"),
        ("", "no_marker"),
    ]:
        with pytest.raises(JudgeReplyError) as caught:
            parse_score(reply)
        assert caught.value.reason == reason, reply


def test_judgment_replies_keep_the_words_without_the_verdict_line() -> None:
    bad = parse_judgment(JUDGMENT_BAD)
    assert not bad.good
    assert bad.text is not None and bad.text.startswith("The response claims")
    assert "[[" not in bad.text and "Verdict" not in bad.text
    good = parse_judgment(JUDGMENT_GOOD)
    assert good.good and good.text is None
    assert parse_judgment("**Verdict:** [[bad]]\nIt is off topic.").text == "It is off topic."
    for reply, reason in [
        ("The response is fine.", "no_marker"),
        ("Verdict: [[BAD]]", "empty_judgment"),  # BAD without saying what is wrong
        ("Verdict: [[GOOD]] or maybe [[BAD]]", "ambiguous"),
    ]:
        with pytest.raises(JudgeReplyError) as caught:
            parse_judgment(reply)
        assert caught.value.reason == reason, reply


def test_pair_replies_parse_strictly() -> None:
    assert parse_pair(PAIR_A) == "a"
    assert parse_pair("Both are equally good. [[C]]") == "tie"
    assert parse_pair("B is more accurate.\n[[B]]") == "b"
    for reply in ("Assistant A is better.", "[[A]] no wait [[B]]", "[A]"):
        with pytest.raises(JudgeReplyError):
            parse_pair(reply)


def test_prompt_versions_follow_the_file_content(tmp_path: Path) -> None:
    shipped = JudgePrompt.load("score-v1.jinja")
    assert shipped.version.startswith("score-v1.jinja@") and len(shipped.version) == 23
    own = tmp_path / "mine.jinja"
    own.write_text("Rate: {{ response }}")
    first = JudgePrompt.load(str(own)).version
    own.write_text("Rate this: {{ response }}")
    assert JudgePrompt.load(str(own)).version != first
    text = shipped.render(
        conversation=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
        ],
        response="Hello!",
    )
    assert "### System:\nBe brief." in text and "### User:\nHi" in text and "Hello!" in text


# --- The models file -----------------------------------------------------------------------

MODELS = "models:\n  - name: smollm2\n    path: builtin:smollm2-135m-instruct\n"


def _deployment(tmp_path: Path, judges: str) -> object:
    path = tmp_path / "models.yaml"
    path.write_text(MODELS + "judges:\n" + judges)
    return load_deployment(path)


def test_models_file_judges_section(tmp_path: Path) -> None:
    (tmp_path / "strict.jinja").write_text("{{ response }}")
    deployment = _deployment(
        tmp_path,
        "  - {name: critic, kind: judgment, url: 'http://127.0.0.1:9/v1', model: gpt-4o,\n"
        "     api_key_env: OPENAI_API_KEY, sample: 0.1, models: [smollm2]}\n"
        "  - {name: grader, kind: score, url: self, model: smollm2, prompt: strict.jinja,\n"
        "     threshold: 8}\n",
    )
    critic, grader = deployment.judges  # type: ignore[attr-defined]
    assert critic.stored_key_id == "judge-critic" and critic.annotator == "judge:critic"
    assert critic.prompt_file == "judgment-v1.jinja" and critic.threshold == 7
    assert grader.prompt == str(tmp_path / "strict.jinja")
    for judges, words in [
        ("  - {name: x, kind: score, url: self, model: m, colour: red}\n", "colour"),
        ("  - {name: x, kind: vibes, url: self, model: m}\n", "kind"),
        ("  - {name: x, kind: score, url: 'ftp://h', model: m}\n", "url"),
        ("  - {name: x, kind: score, url: self, model: m, sample: 1.5}\n", "sample"),
        ("  - {name: x, kind: score, url: self, model: m, models: [nope]}\n", "nope"),
        ("  - {name: x, kind: score, url: self, model: m, prompt: missing.jinja}\n", "missing"),
        (
            "  - {name: x, kind: score, url: self, model: m}\n"
            "  - {name: x, kind: pairwise, url: self, model: m}\n",
            "duplicate judge",
        ),
    ]:
        with pytest.raises(ModelsFileError, match=words):
            _deployment(tmp_path, judges)


def test_a_key_variable_named_but_unset_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ALIGNGATE_TEST_JUDGE_KEY", raising=False)
    entry = JudgeEntry(
        name="j", kind="score", url="http://127.0.0.1:9/v1", model="m",
        api_key_env="ALIGNGATE_TEST_JUDGE_KEY",
    )  # fmt: skip
    with pytest.raises(ModelsFileError, match="ALIGNGATE_TEST_JUDGE_KEY"):
        build_judge(entry)
    with pytest.raises(ModelsFileError, match="self"):
        build_judge(entry.model_copy(update={"url": "self", "api_key_env": None}))


# --- Verdicts in the store (no endpoint: verdicts parsed from real reply strings) ------------


def _record(n: int = 2) -> CompletionRecord:
    return CompletionRecord(
        id=f"chatcmpl-judges-{time.time_ns()}",
        created_at=time.time(),
        endpoint="chat",
        model="smollm2",
        family="chat",
        template_fingerprint="x",
        request=[{"role": "user", "content": "What is the capital of Australia?"}],
        prompt_text="What is the capital of Australia?",
        sampling={},
        choices=[ChoiceRecord(i, t, "stop") for i, t in enumerate(["Sydney.", "Canberra."][:n])],
        prompt_tokens=7,
        completion_tokens=4,
        latency_ms=10,
    )


async def test_verdicts_become_feedback_under_the_judges_key(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        record = _record()
        await asyncio.wrap_future(store.record_completion(record))
        critic = build_judge(
            JudgeEntry(name="critic", kind="judgment", url="self", model="m"),
            self_url="http://x/v1",
        )
        parsed = parse_judgment(JUDGMENT_BAD)
        verdict = Verdict(
            judge="critic", kind="judgment", judge_model="m", prompt_version=critic.prompt.version,
            label="undesirable", judgment=parsed.text, score=None, raw_reply=JUDGMENT_BAD,
            latency_s=1.5, requests=1, prompt_tokens=100, completion_tokens=40,
        )  # fmt: skip
        call = await store_verdict(store, critic, record, 0, verdict, "cli")
        _, feedback = await store.get_completion(record.id)
        (fb,) = feedback
        assert fb.id == call.feedback_id and fb.choice_index == 0
        assert (fb.annotator, fb.key_id) == ("judge:critic", "judge-critic")
        assert fb.label == "undesirable" and fb.judgment == parsed.text
        (stored,) = await store.list_judge_calls(judge="critic")
        assert stored.raw_replies == [JUDGMENT_BAD] and stored.latency_ms == 1500
        assert stored.prompt_version.startswith("judgment-v1.jinja@")

        scorer = build_judge(
            JudgeEntry(name="scorer", kind="score", url="self", model="m"), self_url="http://x/v1"
        )
        scored = Verdict(
            judge="scorer", kind="score", judge_model="m", prompt_version=scorer.prompt.version,
            label="desirable", judgment=None, score=7.0, raw_reply="Rating: [[7]]",
            latency_s=1, requests=1, prompt_tokens=1, completion_tokens=1,
        )  # fmt: skip
        await store_verdict(store, scorer, record, 1, scored, "cli")
        _, feedback = await store.get_completion(record.id)
        (score_fb,) = [f for f in feedback if f.annotator == "judge:scorer"]
        # The 1-10 score on the [0, 1] scale of ratings and labels: (7 - 1) / 9.
        assert score_fb.label == "desirable" and score_fb.reward() == pytest.approx(6 / 9)

        pair_judge = build_judge(
            JudgeEntry(name="pair", kind="pairwise", url="self", model="m"), self_url="http://x/v1"
        )

        def pair(outcome: str, first: str, second: str) -> PairVerdict:
            return PairVerdict(
                judge="pair", judge_model="m", prompt_version=pair_judge.prompt.version,
                outcome=outcome, first=first, second=second,  # type: ignore[arg-type]
                raw_replies=("[[B]]", "[[A]]"), latency_s=2, requests=2,
                prompt_tokens=1, completion_tokens=1,
            )  # fmt: skip

        await store_pair_verdict(store, pair_judge, record, (0, 1), pair("b", "b", "b"), "cli")
        await store_pair_verdict(store, pair_judge, record, (0, 1), pair("tie", "a", "b"), "cli")
        _, feedback = await store.get_completion(record.id)
        preference = [f for f in feedback if f.annotator == "judge:pair"]
        assert len(preference) == 1  # the tie is no preference
        assert (preference[0].choice_index, preference[0].preferred_over_choice) == (1, 0)
        ties = [c for c in await store.list_judge_calls(judge="pair") if c.feedback_id is None]
        assert len(ties) == 1 and ties[0].verdict["outcome"] == "tie"
        assert ties[0].raw_replies == ["[[B]]", "[[A]]"]
    finally:
        store.close()


# --- The gateway's own model as the judge -----------------------------------------------------

# SmolLM2-135M rarely writes a verdict marker (measured: it answers "The answer is 7 out of
# 10." or "Rating: [8]" even when asked to copy "Rating: [[8]]"), so these tests hold for any
# parse rate: the counts must add up, every unparseable reply must be counted and none stored,
# and whatever parses must be stored whole. The stored path itself is pinned above with
# verdicts parsed from real reply strings.


def _chat(gateway: Gateway, content: str, n: int = 1) -> str:
    answer = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json={
            "model": gateway.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 24,
            "temperature": 0.8 if n > 1 else 0,
            "n": n,
            "store": True,
        },
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    return str(answer.json()["id"])


@pytest.fixture(scope="module")
def judged_store(gateway: Gateway, test_env: dict[str, str]) -> Iterator[Store]:
    """The session gateway's own store, with a few fresh completions to judge."""
    for question in ("What is the capital of France?", "Name a primary colour.", "What is 2+2?"):
        _chat(gateway, question)
    _chat(gateway, "Say something about cats.", n=2)
    store = Store.open(test_env["ALIGNGATE_DATABASE_URL"])
    yield store
    store.close()


def _self_judge(gateway: Gateway, **fields: object) -> JudgeEntry:
    values = {"url": f"{gateway.url}/v1", "model": gateway.model, "max_tokens": 48, **fields}
    return JudgeEntry.model_validate(values)


async def test_the_gateway_judges_its_own_stored_completions(
    gateway: Gateway, judged_store: Store, tmp_path: Path
) -> None:
    metrics = JudgeMetrics(CollectorRegistry())
    # Constrained to the score format (vLLM structured outputs through the gateway): even
    # the 135M model writes a marker, so verdicts are stored.
    judge = build_judge(
        _self_judge(gateway, name="self-score", kind="score", constrain=True, max_tokens=64),
        metrics=metrics,
    )
    summary = await judge_stored(judged_store, judge, model=gateway.model, limit=3, seed=0)
    print("score judge (score-v1):", summary.to_json())
    assert 1 <= summary.completions <= 3 and summary.judged >= summary.completions
    assert summary.stored >= 1
    assert summary.stored + summary.unparseable + summary.failed == summary.judged
    assert summary.failed == 0 and summary.requests == summary.judged
    assert metrics.requests.labels(judge="self-score", kind="score")._value.get() == (
        summary.requests
    )
    calls = await judged_store.list_judge_calls(judge="self-score")
    assert len(calls) == summary.stored
    for call in calls:
        assert call.judge_model == gateway.model and call.source == "cli"
        assert call.prompt_version == judge.prompt.version and call.latency_ms > 0
        assert parse_score(call.raw_replies[0]) == call.verdict["score"]
        _, feedback = await judged_store.get_completion(call.completion_id)
        (fb,) = [f for f in feedback if f.id == call.feedback_id]
        assert (fb.annotator, fb.key_id) == ("judge:self-score", "judge-self-score")
        assert fb.label == ("desirable" if call.verdict["score"] >= 7 else "undesirable")
    assert _unparseable(metrics, "self-score") == summary.unparseable
    # A rerun does not judge again what already has this judge's verdict.
    await judge_stored(judged_store, judge, model=gateway.model, limit=1, seed=0)
    calls = await judged_store.list_judge_calls(judge="self-score")
    judged = [(c.completion_id, c.choice_index) for c in calls]  # n=2: one verdict per choice
    assert len(judged) == len(set(judged))


def _unparseable(metrics: JudgeMetrics, judge: str) -> float:
    return sum(
        metrics.errors.labels(judge=judge, reason=r)._value.get()
        for r in ("no_marker", "ambiguous", "out_of_range", "empty_judgment")
    )


async def test_unparseable_replies_are_counted_never_stored(
    gateway: Gateway, judged_store: Store
) -> None:
    metrics = JudgeMetrics(CollectorRegistry())
    # One token cannot hold a verdict marker: every reply is unparseable.
    judge = build_judge(
        _self_judge(gateway, name="self-terse", kind="judgment", max_tokens=1), metrics=metrics
    )
    summary = await judge_stored(judged_store, judge, model=gateway.model, limit=2)
    assert summary.judged >= 1 and summary.unparseable == summary.judged
    assert summary.stored == 0
    assert metrics.errors.labels(judge="self-terse", reason="no_marker")._value.get() == (
        summary.judged
    )
    assert metrics.requests.labels(judge="self-terse", kind="judgment")._value.get() == (
        summary.requests
    )
    assert await judged_store.list_judge_calls(judge="self-terse") == []
    rows, _ = await judged_store.list_feedback()
    assert not [r for r in rows if r.annotator == "judge:self-terse"]


async def test_compare_asks_both_orders(gateway: Gateway) -> None:
    sent: list[dict[str, object]] = []

    async def record(request: httpx.Request) -> None:
        sent.append(json.loads(request.content))

    async with httpx.AsyncClient(timeout=120, event_hooks={"request": [record]}) as client:
        judge = build_judge(
            _self_judge(gateway, name="self-pair", kind="pairwise", max_tokens=32),
            metrics=JudgeMetrics(CollectorRegistry()),
            client=client,
        )
        conversation = [{"role": "user", "content": "What is the capital of Australia?"}]
        first_answer, second_answer = "Canberra is the capital.", "Sydney is the capital."
        try:
            verdict = await compare(judge, conversation, first_answer, second_answer)
            print("pairwise verdict:", verdict.first, verdict.second, verdict.outcome)
            assert verdict.requests == 2 and len(verdict.raw_replies) == 2
            assert verdict.outcome == (verdict.first if verdict.first == verdict.second else "tie")
        except JudgeReplyError as exc:
            print("pairwise unparseable:", exc, exc.replies)
            assert len(exc.replies) == 2
    assert len(sent) == 2  # both orders, whatever the replies
    shown = [str(body["messages"][0]["content"]) for body in sent]  # type: ignore[index]
    orders = sorted(text.index(first_answer) < text.index(second_answer) for text in shown)
    assert orders == [False, True]  # once A first, once B shown as assistant A
    for body in sent:
        assert body["store"] is False and body["user"] == "judge:self-pair"
        assert body["temperature"] == 0


def test_aligngate_judge_cli(
    gateway: Gateway, judged_store: Store, test_env: dict[str, str], tmp_path: Path
) -> None:
    config = tmp_path / "models.yaml"
    config.write_text(
        MODELS
        + "judges:\n"
        + f"  - {{name: cli-score, kind: score, url: '{gateway.url}/v1', model: {gateway.model},\n"
        + "     max_tokens: 32}\n"
    )
    done = run_cli(
        ["judge", "--config", str(config), "--model", gateway.model, "--judge", "cli-score",
         "--limit", "1", "--since", "0"],
        test_env,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    print("aligngate judge:", summary)
    assert summary["completions"] == 1
    assert summary["stored"] + summary["unparseable"] + summary["failed"] == summary["judged"]
    calls = asyncio.run(judged_store.list_judge_calls(judge="cli-score"))
    assert len(calls) == summary["stored"]
    bad = run_cli(["judge", "--config", str(config), "--model", "x", "--judge", "nope"], test_env)
    assert bad.returncode == 2 and "no judge 'nope'" in bad.stderr


# --- Live traffic: a gateway whose models file samples every completion ----------------------


@pytest.fixture(scope="module")
def sampling_gateway(
    default_model_path: Path, test_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    folder = tmp_path_factory.mktemp("judging-gateway")
    gw = start_own_gateway(
        folder,
        MODELS
        + "    store: true\n"
        + "    lora: {}\n"  # the promotion gate's iteration hot-loads its adapter
        + "judges:\n"
        + "  - {name: live, kind: score, url: self, model: smollm2, sample: 1.0,\n"
        + "     max_tokens: 48, requests_per_minute: 600, constrain: true}\n"
        + "  - {name: gatekeeper, kind: pairwise, url: self, model: smollm2, max_tokens: 48,\n"
        + "     constrain: true, requests_per_minute: 600}\n",
        test_env,
        {},
    )
    gw.model = "smollm2"
    yield gw
    assert stop_gateway(gw) == 0, gw.log_tail()
    assert "Traceback" not in gw.log_path.read_text(errors="replace"), gw.log_tail(120)


def _metric(gateway: Gateway, name: str) -> float:
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def test_live_traffic_is_judged_in_the_background(sampling_gateway: Gateway) -> None:
    gw = sampling_gateway
    started = time.perf_counter()
    completion_id = _chat(gw, "What is the capital of Italy?")
    answered = time.perf_counter() - started
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        verdicts = _metric(gw, "aligngate_judge_verdicts_total")
        unparseable = _metric(gw, "aligngate_judge_errors_total")
        if verdicts + unparseable >= 1:
            break
        time.sleep(1)
    else:
        pytest.fail(f"no judge verdict in 120 s:\n{gw.log_tail()}")
    print(f"live: answered in {answered:.2f} s; verdicts {verdicts}, errors {unparseable}")
    assert verdicts >= 1  # constrained: the 135M judge's reply always carries a marker
    # Stored verdicts are feedback too: counted per model under the judge's source.
    text = httpx.get(f"{gw.url}/metrics", timeout=10).text
    assert any(
        line.startswith("aligngate_feedback_total{") and 'source="judge:live"' in line
        for line in text.splitlines()
    )
    assert _metric(gw, "aligngate_judge_requests_total") >= 1
    store = Store.open(f"sqlite:///{gw.log_path.parent / 'store.db'}")
    try:
        calls = asyncio.run(store.list_judge_calls(judge="live"))
        assert len(calls) == verdicts
        for call in calls:
            assert call.completion_id == completion_id and call.source == "live"
            _, feedback = asyncio.run(store.get_completion(completion_id))
            assert [(f.key_id, f.annotator) for f in feedback] == [("judge-live", "judge:live")]
        # The judge's own request was not stored, so it is not judged in turn.
        time.sleep(2)
        assert _metric(gw, "aligngate_judge_requests_total") == 1
        stored = asyncio.run(store.unjudged_completions(judge="no-such-judge"))
        assert [r.id for r in stored] == [completion_id]
    finally:
        store.close()


async def test_a_constrained_pairwise_judge_always_gives_a_verdict(gateway: Gateway) -> None:
    judge = build_judge(
        _self_judge(gateway, name="self-pair-c", kind="pairwise", constrain=True, max_tokens=48),
        metrics=JudgeMetrics(CollectorRegistry()),
    )
    conversation = [{"role": "user", "content": "What is the capital of Australia?"}]
    verdict = await compare(judge, conversation, "Canberra.", "Sydney.")
    print("constrained pairwise:", verdict.first, verdict.second, verdict.outcome)
    assert verdict.requests == 2 and verdict.outcome in ("a", "b", "tie")
    for reply in verdict.raw_replies:
        assert re.fullmatch(reply_pattern("pairwise", 48), reply)


def _poll_job(gateway: Gateway, job_id: str, timeout: float = 900) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{gateway.url}/admin/align/{job_id}", timeout=10).json()
        if job["status"] in ("succeeded", "failed"):
            return job  # type: ignore[no-any-return]
        time.sleep(2)
    raise AssertionError(f"align job {job_id} did not finish:\n{gateway.log_tail()}")


@pytest.mark.slow
def test_an_iteration_is_promoted_only_when_it_wins_its_gate(
    sampling_gateway: Gateway, adapters_root: Path
) -> None:
    """Train → hot-load → the candidate and the version ``smollm2@latest`` serves answer an
    AlpacaEval slice → the pairwise judge (the gateway's own model, constrained) compares
    each pair in both orders → the alias moves only if the gate's rule says so; the job
    reports the win rate, its interval, ties and the judge's cost; each judged pair is a
    battle of source ``judge:gatekeeper`` on the leaderboard."""
    gw = sampling_gateway
    eval_set = real_file(EVAL_SET)
    completion_id = _chat(gw, "What is the largest planet in the solar system?")
    posted = httpx.post(
        f"{gw.url}/v1/feedback",
        json={"completion_id": completion_id, "judgment": "Name the planet: Jupiter."},
        timeout=30,
    )
    assert posted.status_code == 201, posted.text
    reviewed = httpx.post(
        f"{gw.url}/admin/feedback/review", json={"ids": [posted.json()["id"]]}, timeout=30
    )
    assert reviewed.status_code == 200
    body = {
        "model": gw.model,
        "hyperparameters": {"epochs": 1, "batch_size": 1, "warmup_steps": 0},
        "gate": {"instructions": str(eval_set), "size": 4, "max_tokens": 24},
    }
    # The judge is this gateway's own base model: a model judging itself, refused by default.
    own = httpx.post(f"{gw.url}/admin/align", json=body, timeout=30)
    assert own.status_code == 400 and own.json()["error"]["param"] == "gate.judge"
    assert "allow_self_judging" in own.json()["error"]["message"]
    body["gate"]["allow_self_judging"] = True  # this test is about the gate's plumbing
    bad = httpx.post(f"{gw.url}/admin/align", json={**body, "gate": {"judge": "live"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "gate.judge"
    started = httpx.post(f"{gw.url}/admin/align", json=body, timeout=30)
    assert started.status_code == 202, started.text
    job = _poll_job(gw, started.json()["id"])
    assert job["status"] == "succeeded", job
    gate = job["gate"]
    print("gate:", json.dumps({k: v for k, v in gate.items() if k != "reason"}), gate["reason"])
    assert gate["candidate"] == job["adapter"] and gate["incumbent"] == gw.model
    assert gate["judge"] == "gatekeeper" and gate["items"] == 4
    assert gate["judged"] + gate["unparseable"] == 4
    assert gate["wins"] + gate["losses"] + gate["ties"] == gate["judged"]
    assert gate["requests"] == 2 * 4  # both orders of every pair
    assert gate["prompt_tokens"] > 0 and gate["completion_tokens"] > 0
    assert gate["lower_bound"] <= gate["win_rate"] and 0 <= gate["p_value"] <= 1
    assert gate["mode"] == "superiority" and 0 <= gate["flips"] <= gate["judged"]
    assert gate["candidate_mean_tokens"] > 0 and gate["incumbent_mean_tokens"] > 0
    assert 0 <= gate["candidate_truncated"] <= 4 and 0 <= gate["incumbent_truncated"] <= 4
    assert 0 <= gate["lc_lower_bound"] <= gate["lc_win_rate"] <= 1 or gate["judged"] == 0
    rule = gate["decided"] and gate["judged"] > 0 and gate["lower_bound"] > 0.5
    assert job["promoted"] is gate["promoted"] is rule
    # Every answer and verdict, beside the candidate: the audit trail (alpaca_eval's outputs).
    audit = json.loads((adapters_root / job["adapter"] / "gate.json").read_text())
    rows = json.loads(eval_set.read_text())  # the slice is spread over the set
    spread = [rows[i]["instruction"] for i in (0, 201, 402, 603)]
    assert [o["instruction"] for o in audit["outputs"]] == spread
    assert {k: v for k, v in audit.items() if k != "outputs"} == gate
    assert all(o["candidate_finish"] in ("stop", "length") for o in audit["outputs"])
    judged = [o for o in audit["outputs"] if o["winner"] is not None]
    assert len(judged) == gate["judged"] and not gate["incumbent_cached"]
    alias = httpx.get(f"{gw.url}/v1/models/{gw.model}@latest", timeout=10).json()
    assert alias["alias_of"] == (job["adapter"] if rule else gw.model)
    served = {m["id"] for m in httpx.get(f"{gw.url}/v1/models", timeout=10).json()["data"]}
    assert job["adapter"] in served  # promoted or not, it stays loaded under its own name
    metrics = httpx.get(f"{gw.url}/metrics", timeout=10).text
    assert f'aligngate_gate_win_rate{{model="{gw.model}"}}' in metrics
    board = httpx.get(
        f"{gw.url}/v1/leaderboard", params={"source": "judge:gatekeeper"}, timeout=60
    ).json()
    if gate["judged"]:
        rated = {row["model"]: row for row in board["data"]}
        assert rated[job["adapter"]]["battles"] == gate["judged"]

    # The next iteration: an incumbent that was not replaced is not asked again; its
    # answers come from the last gate (the candidate alone generates).
    completion_id = _chat(gw, "What is the smallest planet in the solar system?")
    posted = httpx.post(
        f"{gw.url}/v1/feedback",
        json={"completion_id": completion_id, "judgment": "Name the planet: Mercury."},
        timeout=30,
    )
    httpx.post(f"{gw.url}/admin/feedback/review", json={"ids": [posted.json()["id"]]}, timeout=30)
    started = httpx.post(f"{gw.url}/admin/align", json=body, timeout=30)
    assert started.status_code == 202, started.text
    again = _poll_job(gw, started.json()["id"])
    assert again["status"] == "succeeded", again
    assert again["gate"]["incumbent_cached"] is (not job["promoted"])
    if not job["promoted"]:
        second = json.loads((adapters_root / again["adapter"] / "gate.json").read_text())
        assert [o["incumbent"] for o in second["outputs"]] == [
            o["incumbent"] for o in audit["outputs"]
        ]
