"""The load generator: its statistics on known streams, failures recorded as data, and real runs
against a live gateway and (slow) the side-by-side comparison with raw vLLM."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import httpx
import pytest

from loadtest.client import Target, TargetError, request_body, require_loopback, send
from loadtest.report import results_table
from loadtest.runner import Load, run_load
from loadtest.stats import RequestResult, Slo, percentile, summarize
from loadtest.workload import Item, alpaca_eval, prompts_file, request_stream, token_counter
from tests.conftest import Gateway, free_port, run_cli
from tests.data import (
    CUT_13B_OUTPUTS,
    EVAL_SET,
    instructions,
    real_file,
    write_eval_set,
    write_reference,
)


@pytest.fixture
def workload(tmp_path: Path) -> list[str]:
    """A small AlpacaEval workload (12 instructions and reference outputs): the runs need
    some requests, not the real set."""
    items = instructions(12)
    eval_set = write_eval_set(tmp_path / "eval_set.json", 12)
    reference = write_reference(tmp_path / "reference.json", items)
    return ["--eval-set", str(eval_set), "--reference", str(reference)]


# --- statistics -------------------------------------------------------------------------------


def test_percentile_interpolates_like_numpy() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def _result(ttft: float, gaps: list[float], tokens: int, started: float = 0.0) -> RequestResult:
    return RequestResult(
        started_at=started,
        ttft=ttft,
        itl=gaps,
        latency=ttft + sum(gaps),
        output_tokens=tokens,
        expected_tokens=tokens,
        status=200,
    )


def test_tpot_follows_vllm_bench_definition() -> None:
    r = _result(0.1, [0.02, 0.03, 0.04], tokens=4)
    # (E2E − TTFT) / (tokens − 1) = 0.09 / 3
    assert r.tpot == pytest.approx(0.03)
    assert _result(0.1, [], tokens=1).tpot is None  # one token: no TPOT
    assert RequestResult(started_at=0, error="HTTP 500: x").tpot is None


def test_summary_of_hand_computed_runs() -> None:
    results = [
        _result(0.100, [0.010, 0.010], tokens=3),
        _result(0.300, [0.030, 0.050], tokens=3),
        RequestResult(
            started_at=0.5, error="HTTP 429: busy", status=429, latency=0.004, expected_tokens=3
        ),
    ]
    s = summarize(results, duration_s=2.0, slo=Slo(ttft_ms=200))
    assert (s["requests"], s["completed"], s["errors"]) == (3, 2, 1)
    assert s["error_rate"] == pytest.approx(1 / 3)
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_throughput"] == pytest.approx(3.0)  # 6 tokens / 2 s
    assert s["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert s["ttft_ms"]["mean"] == pytest.approx(200.0)
    # ITL pools every gap of every request: 10, 10, 30, 50 ms.
    assert s["itl_ms"]["p50"] == pytest.approx(20.0)
    assert s["itl_ms"]["p99"] == pytest.approx(30 + 0.97 * 20)
    assert s["tpot_ms"]["p50"] == pytest.approx((10 + 40) / 2)
    assert s["e2e_ms"]["p90"] == pytest.approx(120 + 0.9 * (380 - 120))
    # Goodput: only the first request meets TTFT ≤ 200 ms; the failure never does.
    assert s["goodput"] == pytest.approx(0.5)
    assert s["error_samples"] == ["HTTP 429: busy"]
    # The refusal's time is kept apart from the answers' E2E.
    assert s["errors_by_status"] == {"429": 1}
    assert s["error_ms"]["p50"] == pytest.approx(4.0)
    table = results_table({"gw": [{**s, "load": {"concurrency": 4}}]})
    assert table.splitlines()[-1].endswith("| 1 (33.3%; 429×1 in p99 4.0 ms) |")


def test_slo_checks_every_objective() -> None:
    r = _result(0.1, [0.05, 0.05], tokens=3)  # TPOT 50 ms, E2E 200 ms
    assert Slo(ttft_ms=100, tpot_ms=50, e2e_ms=200).met_by(r)
    assert not Slo(tpot_ms=49).met_by(r)
    assert not Slo(e2e_ms=199).met_by(r)
    assert Slo(tpot_ms=1).met_by(_result(0.1, [], tokens=1))  # no TPOT to miss


# --- the client on synthetic streams ----------------------------------------------------------


def _sse(chunks: list[dict], delays: list[float], done: bool = True) -> httpx.AsyncByteStream:
    class Stream(httpx.AsyncByteStream):
        async def __aiter__(self):  # type: ignore[no-untyped-def]
            for chunk, delay in zip(chunks, delays, strict=True):
                await asyncio.sleep(delay)
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            if done:
                yield b"data: [DONE]\n\n"

    return Stream()


def _chat_chunk(text: str) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


TARGET = Target("http://127.0.0.1:9", "m")
ITEM = Item("hi", 3)


async def _send_with(handler, item: Item = ITEM) -> RequestResult:  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        return await send(client, TARGET, item, time.perf_counter())


async def test_ttft_and_itl_are_measured_per_content_chunk() -> None:
    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant"}}]},  # no content: not a token
        _chat_chunk("A"),
        _chat_chunk("B"),
        _chat_chunk("C"),
        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}},
    ]
    delays = [0.0, 0.2, 0.05, 0.1, 0.0]

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["ignore_eos"] is True and body["max_tokens"] == 3
        return httpx.Response(200, stream=_sse(chunks, delays))

    r = await _send_with(handler)
    assert r.ok, r.error
    assert (r.output_tokens, r.prompt_tokens) == (3, 5)
    assert 0.2 <= r.ttft < 0.2 + 0.15
    assert len(r.itl) == 2
    assert 0.05 <= r.itl[0] < 0.05 + 0.1
    assert 0.1 <= r.itl[1] < 0.1 + 0.1
    assert r.latency >= r.ttft + sum(r.itl)
    assert r.tpot == pytest.approx((r.latency - r.ttft) / 2)


async def test_completions_stream_without_usage_counts_chunks() -> None:
    chunks = [{"choices": [{"index": 0, "text": t}]} for t in ("x", "y")]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=_sse(chunks, [0.0, 0.0]))

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        target = Target("http://127.0.0.1:9", "m", endpoint="completions")
        r = await send(client, target, Item("p", 2), time.perf_counter())
    assert r.ok and r.output_tokens == 2 and len(r.itl) == 1


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (
            httpx.Response(429, json={"error": {"message": "too many requests", "code": 429}}),
            "HTTP 429: too many requests",
        ),
        (httpx.Response(500, text="<html>boom</html>"), "HTTP 500: <html>boom</html>"),
        (
            httpx.Response(
                200, stream=_sse([_chat_chunk("a"), {"error": {"message": "engine died"}}], [0, 0])
            ),
            "HTTP 200: engine died",
        ),
        (httpx.Response(200, stream=_sse([], [])), "stream ended without content"),
    ],
)
async def test_failures_are_recorded_not_raised(response: httpx.Response, expected: str) -> None:
    r = await _send_with(lambda request: response)
    assert not r.ok
    assert r.error == expected
    assert r.tpot is None
    if r.status is not None and r.status >= 400:
        assert r.latency is not None and r.latency >= 0  # how fast the refusal came


async def test_malformed_stream_and_dead_server_are_recorded() -> None:
    def garbage(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"data: {not json\n\n")

    r = await _send_with(garbage)
    assert r.error is not None and r.error.startswith("bad stream")

    # A real closed port on loopback: connection refused becomes data.
    target = Target(f"http://127.0.0.1:{free_port()}", "m")
    async with httpx.AsyncClient() as client:
        r = await send(client, target, Item("p", 1), time.perf_counter())
    assert r.error is not None and r.error.startswith("ConnectError")
    assert summarize([r], 1.0)["error_rate"] == 1.0


def test_only_loopback_targets() -> None:
    require_loopback("http://127.0.0.1:8000")
    require_loopback("http://localhost:8000")
    require_loopback("http://[::1]:8000")
    for url in ("http://10.1.2.3:8000", "http://8.8.8.8", "ftp://127.0.0.1", "nonsense"):
        with pytest.raises(TargetError):
            require_loopback(url)


def test_request_bodies() -> None:
    chat = request_body(Target("u", "m"), Item("hello", 7))
    assert chat["messages"] == [{"role": "user", "content": "hello"}]
    assert chat["max_tokens"] == 7 and chat["temperature"] == 0.0
    completion = request_body(
        Target("u", "m", endpoint="completions", ignore_eos=False), Item("p", 2)
    )
    assert completion["prompt"] == "p" and "ignore_eos" not in completion


# --- runner -----------------------------------------------------------------------------------


def _counting_handler(calls: list[float]):  # type: ignore[no-untyped-def]
    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(time.perf_counter())
        await asyncio.sleep(0.01)
        return httpx.Response(200, stream=_sse([_chat_chunk("a"), _chat_chunk("b")], [0, 0]))

    return handler


async def test_closed_loop_sends_exactly_the_requested_count(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls: list[float] = []
    monkeypatch.setattr(
        "loadtest.runner._client",
        lambda n, t: httpx.AsyncClient(transport=httpx.MockTransport(_counting_handler(calls))),
    )
    items = request_stream([Item("a", 2), Item("b", 2)], seed=1)
    run = await run_load(TARGET, items, Load(concurrency=4, num_requests=10), warmup=1)
    assert len(calls) == 11 and len(run.results) == 10  # one warm-up, unrecorded
    assert all(r.ok and r.output_tokens == 2 for r in run.results)
    assert run.summary()["load"]["concurrency"] == 4


async def test_poisson_arrivals_and_duration_bound(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls: list[float] = []
    monkeypatch.setattr(
        "loadtest.runner._client",
        lambda n, t: httpx.AsyncClient(transport=httpx.MockTransport(_counting_handler(calls))),
    )
    items = request_stream([Item("a", 2)], seed=0)
    run = await run_load(TARGET, items, Load(rate=50.0, num_requests=40), warmup=0)
    assert len(run.results) == 40
    # 40 arrivals at 50/s take about 0.8 s (exponential gaps; wide bounds).
    assert 0.2 < run.results[-1].started_at < 3.0
    bounded = await run_load(
        TARGET, items, Load(rate=20.0, num_requests=1000, duration_s=0.5), warmup=0
    )
    assert 1 <= len(bounded.results) < 40


def test_load_validation() -> None:
    with pytest.raises(ValueError):
        Load()
    with pytest.raises(ValueError):
        Load(concurrency=2, rate=1.0)
    with pytest.raises(ValueError):
        Load(concurrency=0)


# --- workloads --------------------------------------------------------------------------------


def test_alpaca_eval_workload_uses_reference_lengths(tokenizer, default_model_path) -> None:  # type: ignore[no-untyped-def]
    eval_set, cut_13b = real_file(EVAL_SET), real_file(CUT_13B_OUTPUTS)
    items = alpaca_eval(
        eval_set,
        cut_13b,
        max_tokens=10_000,
        count_tokens=token_counter(str(default_model_path)),
    )
    assert len(items) == 805
    reference = json.loads(cut_13b.read_text())
    first = reference[0]
    assert items[0].prompt == first["instruction"]
    assert items[0].max_tokens == len(
        tokenizer(first["output"], add_special_tokens=False)["input_ids"]
    )
    capped = alpaca_eval(eval_set, cut_13b, 128, token_counter(None))
    assert max(i.max_tokens for i in capped) == 128
    assert min(i.max_tokens for i in capped) >= 1
    # Without a tokenizer: ~4 characters per token.
    assert capped[0].max_tokens == min(128, math.ceil(len(first["output"]) / 4))


def test_prompts_file(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text('plain prompt\n\n{"prompt": "json prompt", "max_tokens": 500}\n')
    assert prompts_file(path, 64) == [Item("plain prompt", 64), Item("json prompt", 64)]


# --- real runs --------------------------------------------------------------------------------


def _loadtest(args: list[str], env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return run_cli(args, env, timeout=900, module="loadtest")


def test_run_against_live_gateway(
    gateway: Gateway, tmp_path: Path, default_model_path: Path, workload: list[str]
) -> None:
    out = tmp_path / "run"
    proc = _loadtest(
        ["run", "--url", gateway.url, "--model", gateway.model, "--concurrency", "1,3",
         "--num-requests", "6", "--max-tokens", "8", "--tokenizer", str(default_model_path),
         "--slo-ttft-ms", "60000", "--out", str(out), *workload]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert [r["load"]["concurrency"] for r in runs] == [1, 3]
    for r in runs:
        assert (r["requests"], r["completed"], r["errors"]) == (6, 6, 0)
        assert r["short_answers"] == 0  # ignore_eos: every answer has its asked-for length
        assert r["output_tokens"] > 6 and r["ttft_ms"]["p50"] > 0 and r["tpot_ms"]["p50"] > 0
        assert r["goodput"] == pytest.approx(r["request_throughput"])
    per_request = json.loads((out / "requests-c=3.json").read_text())
    assert len(per_request) == 6 and all(r["error"] is None for r in per_request)
    assert (out / "latency.png").stat().st_size > 10_000
    assert (out / "throughput.png").stat().st_size > 10_000
    assert "| c=3 |" in (out / "results.md").read_text()


def test_run_refuses_non_loopback_target() -> None:
    proc = _loadtest(["run", "--url", "http://192.0.2.1:8000", "--model", "m"])
    assert proc.returncode == 2
    assert "not a loopback address" in proc.stderr


@pytest.mark.slow
def test_side_by_side_against_raw_vllm(
    test_env: dict[str, str], default_model_path: Path, tmp_path: Path, workload: list[str]
) -> None:
    out = tmp_path / "compare"
    proc = _loadtest(
        ["compare", "--model-path", str(default_model_path), "--concurrency", "1,2",
         "--num-requests", "4", "--overhead-requests", "5", "--max-tokens", "8",
         "--kv-cache-gib", "1", "--rounds", "2", "--out", str(out), *workload],
        env=test_env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((out / "results.json").read_text())
    assert set(payload["servers"]) == {"raw-vllm", "aligngate"}
    for server in payload["servers"].values():
        # Two rounds (raw, gateway, gateway, raw), pooled per server.
        assert len(server["start_s"]) == 2 and min(server["start_s"]) > 0
        assert server["overhead_probe"]["completed"] == 10
        assert [lvl["completed"] for lvl in server["levels"]] == [8, 8]
        assert all(lvl["cpu"]["front_end_s"] > 0 and lvl["cpu"]["engine_s"] > 0
                   for lvl in server["levels"])  # fmt: skip
        assert all(lvl["errors"] == 0 and lvl["short_answers"] == 0 for lvl in server["levels"])
    # Both servers answered the identical workload: the same token counts.
    tokens = {
        k: [lvl["output_tokens"] for lvl in v["levels"]] for k, v in payload["servers"].items()
    }
    assert tokens["raw-vllm"] == tokens["aligngate"]
    assert [row["load"] for row in payload["ratios"]] == ["c=1", "c=2"]
    assert all(row["output tok/s"] > 0 for row in payload["ratios"])
    assert "overhead" in (out / "results.md").read_text()


def test_missing_default_workload_says_what_to_pass(tmp_path: Path) -> None:
    env = {**os.environ, "ALIGNGATE_TEST_DATA": str(tmp_path / "absent")}
    proc = _loadtest(["run", "--url", "http://127.0.0.1:9", "--model", "m"], env)
    assert proc.returncode == 2
    assert "pass --eval-set FILE" in proc.stderr and "ALIGNGATE_TEST_DATA" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_default_setup_gives_raw_vllm_the_gateways_default_settings() -> None:
    from loadtest.servers import DEFAULT_LORA_FLAGS, DEFAULT_MAX_MODEL_LEN
    from server.models.models_file import default_entries

    (entry,) = default_entries()
    lora = entry.lora_settings
    assert entry.store and lora is not None
    assert entry.max_model_len == DEFAULT_MAX_MODEL_LEN
    flags = dict(zip(DEFAULT_LORA_FLAGS[1::2], DEFAULT_LORA_FLAGS[2::2], strict=True))
    assert DEFAULT_LORA_FLAGS[0] == "--enable-lora"
    assert flags == {
        "--max-lora-rank": str(lora.max_rank),
        "--max-loras": str(lora.max_loras),
        "--max-cpu-loras": str(lora.max_cpu_loras),
    }


def test_the_ray_row_serves_the_strict_models_file_on_a_cluster(tmp_path: Path) -> None:
    """`--servers aligngate,aligngate-ray`: the same model and length as the local row, plus
    `cluster:` (the gateway reads it as a Ray deployment of the asked-for replicas)."""
    from loadtest.compare import CompareConfig, _specs, replica_cpus
    from loadtest.servers import write_models_file
    from server.models.models_file import load_deployment

    # One replica gets the machine's cores, as the local engine has them (its threads).
    assert [replica_cpus(2, n) for n in (1, 2, 4)] == [2, 1, 1]
    assert replica_cpus(16, 4) == 4

    common = dict(model_path=tmp_path, served_name="m", max_model_len=2048)
    local = load_deployment(write_models_file(tmp_path / "local.yaml", **common))
    ray = load_deployment(
        write_models_file(
            tmp_path / "ray.yaml",
            **common,
            cluster={"backend": "ray", "address": "127.0.0.1:6379", "namespace": "bench"},
            replicas=2,
            replica_cpus=3,
        )
    )
    assert local.cluster is None and ray.cluster is not None
    assert ray.cluster.address == "127.0.0.1:6379"
    (l_entry,), (r_entry,) = local.models, ray.models
    assert r_entry.replicas == 2 and r_entry.num_cpus == 3
    assert r_entry.model_dump(exclude={"replicas", "num_cpus"}) == l_entry.model_dump(
        exclude={"replicas", "num_cpus"}
    )
    config = CompareConfig(
        model_path=tmp_path,
        served_name="m",
        items=[],
        concurrency=[1],
        requests_per_level={1: 1},
        out_dir=tmp_path,
        servers=("aligngate", "aligngate-ray"),
    )
    assert [s.label for s in _specs(config)] == ["aligngate", "aligngate-ray"]
    with pytest.raises(ValueError, match="strict setup only"):
        _specs(dataclasses.replace(config, setup="default"))


def test_the_scaling_estimate_by_hand() -> None:
    from loadtest.scaling import ReplicaCurve, estimate

    # 20 tok/s alone, 200 at 16 in flight: 16·20 / (1 + 15α) = 200 → α = 0.04.
    curve = ReplicaCurve.fit(20.0, 16, 200.0)
    assert math.isclose(curve.alpha, 0.04)
    assert math.isclose(curve.tokens_per_s(16), 200.0)
    # Two replicas of 8 each: 2 · 8·20 / 1.28 = 250; a 2 ms/1k-token front end never binds.
    two = estimate(curve, replicas=[1, 2], concurrency=[16], front_end_ms_per_1k_tokens=2.0)
    assert [round(r["tokens_per_s"]) for r in two] == [200, 250]
    assert two[1]["bound"] == "replicas" and math.isclose(two[1]["speedup"], 1.25)
    # A front end that spends 3 CPU ms per token streams at most 333 tok/s.
    (eight,) = estimate(curve, replicas=[8], concurrency=[64], front_end_ms_per_1k_tokens=3000.0)
    assert eight["bound"] == "front end" and round(eight["tokens_per_s"]) == 333


def test_startup_times_the_default_gateway_with_either_core_against_raw_vllm(
    test_env: dict[str, str], default_model_path: Path, tmp_path: Path
) -> None:
    """`python -m loadtest startup`: three real starts, one per server; the gateway's two
    variants differ only in how the engine core's process begins (their logs say so)."""
    out = tmp_path / "startup"
    proc = _loadtest(
        ["startup", "--model-path", str(default_model_path), "--rounds", "1",
         "--kv-cache-gib", "1", "--out", str(out)],
        env=test_env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((out / "startup.json").read_text())
    starts = payload["start_s"]
    assert list(starts) == ["raw-vllm", "aligngate-spawned-core", "aligngate"]
    assert all(len(runs) == 1 and runs[0] > 0 for runs in starts.values())
    assert "Engine core forked from the preloaded process" in (out / "aligngate-1.log").read_text()
    spawned = (out / "aligngate-spawned-core-1.log").read_text()
    assert "Models ready" in spawned and "fork server" not in spawned
    table = (out / "startup.md").read_text()
    assert "| raw-vllm | 1 |" in table and "| 1.00 |" in table


def test_the_startup_table_compares_medians_with_raw_vllm() -> None:
    from loadtest.startup import markdown

    table = markdown({"raw-vllm": [30.0, 20.0, 25.0], "aligngate": [20.0, 22.0, 19.0]})
    assert "| raw-vllm | 3 | 25.0 | 20.0 | 30.0 | 1.00 |" in table
    assert "| aligngate | 3 | 20.0 | 19.0 | 22.0 | 0.80 |" in table
