"""``python -m loadtest``: load any OpenAI-compatible server on loopback, or compare the
gateway with raw vLLM side by side.

    python -m loadtest run --url http://127.0.0.1:8000 --model smollm2-135m-instruct \
        --concurrency 1,4,16 --num-requests 64 --max-tokens 128
    python -m loadtest compare --concurrency 1,16 --max-tokens 128
    python -m loadtest startup --rounds 3
    python -m loadtest gate-power --json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
from pathlib import Path

from loadtest import report
from loadtest.client import Target, TargetError, require_loopback
from loadtest.compare import CompareConfig, default_model_path, markdown, run_compare
from loadtest.runner import Load, run_load
from loadtest.stats import Slo
from loadtest.workload import (
    Item,
    WorkloadError,
    alpaca_eval,
    prompts_file,
    request_stream,
    token_counter,
)

REPO = Path(__file__).resolve().parent.parent
# The AlpacaEval files' default home: the data folder the test suite uses too
# (ALIGNGATE_TEST_DATA, else ../shared/data beside the repo).
DATA = Path(os.environ.get("ALIGNGATE_TEST_DATA") or REPO.parent / "shared" / "data")
DEFAULT_EVAL_SET = DATA / "alpaca_eval" / "eval_set.json"
DEFAULT_REFERENCE = DATA / "alpaca_eval" / "reference" / "cut-13b.json"


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected integers like 1,4,16: {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("every value must be at least 1")
    return values


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _workload_args(p: argparse.ArgumentParser) -> None:
    w = p.add_argument_group("workload")
    w.add_argument("--prompts", type=Path, help="prompts file instead of AlpacaEval")
    w.add_argument(
        "--eval-set",
        type=Path,
        help=f"AlpacaEval instructions (alpaca_eval's eval set; default {DEFAULT_EVAL_SET})",
    )
    w.add_argument(
        "--reference",
        type=Path,
        help=f"AlpacaEval outputs whose lengths the requests ask for (default {DEFAULT_REFERENCE})",
    )
    w.add_argument("--max-tokens", type=int, default=128, help="cap on each request's length")
    w.add_argument(
        "--tokenizer", help="tokenizer folder for reference lengths (default: ~4 chars/token)"
    )
    w.add_argument(
        "--endpoint", choices=("chat", "completions"), default="chat", help="which API to load"
    )
    w.add_argument("--seed", type=int, default=0, help="the workload's random seed")
    w.add_argument("--slo-ttft-ms", type=float, help="goodput: TTFT objective")
    w.add_argument("--slo-tpot-ms", type=float, help="goodput: TPOT objective")
    w.add_argument("--slo-e2e-ms", type=float, help="goodput: end-to-end objective")


def _items(args: argparse.Namespace, tokenizer: str | None) -> list[Item]:
    if args.max_tokens < 1:
        raise WorkloadError("--max-tokens must be at least 1")
    if args.prompts:
        return prompts_file(args.prompts, args.max_tokens)
    eval_set = args.eval_set or _default_file(DEFAULT_EVAL_SET, "--eval-set", "instructions")
    reference = args.reference or _default_file(
        DEFAULT_REFERENCE, "--reference", "model outputs whose lengths the requests ask for"
    )
    return alpaca_eval(eval_set, reference, args.max_tokens, token_counter(tokenizer))


def _default_file(path: Path, flag: str, what: str) -> Path:
    if path.is_file():
        return path
    raise WorkloadError(
        f"no {path} (the default AlpacaEval {what}): pass {flag} FILE, set "
        "ALIGNGATE_TEST_DATA to the folder holding alpaca_eval/, or use --prompts FILE. "
        "The files come from the alpaca_eval repository: its evaluation set "
        "(tatsu-lab/alpaca_eval, alpaca_eval.json) and a model's outputs "
        "(results/<model>/model_outputs.json, e.g. cut-13b)"
    )


def _slo(args: argparse.Namespace) -> Slo | None:
    if args.slo_ttft_ms is None and args.slo_tpot_ms is None and args.slo_e2e_ms is None:
        return None
    return Slo(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_e2e_ms)


def _default_out(kind: str) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return REPO / "loadtest" / "results" / f"{kind}-{stamp}"


def _cmd_run(args: argparse.Namespace) -> int:
    require_loopback(args.url)
    items = _items(args, args.tokenizer)
    target = Target(
        args.url.rstrip("/").removesuffix("/v1"),
        args.model,
        args.endpoint,
        _secret(args.api_key_file, "ALIGNGATE_API_KEY"),
    )
    if args.rate is not None:
        loads = [
            Load(
                rate=args.rate,
                num_requests=args.num_requests,
                duration_s=args.duration,
                max_concurrency=args.concurrency[0] if args.concurrency else None,
            )
        ]
    else:
        loads = [
            Load(concurrency=c, num_requests=args.num_requests, duration_s=args.duration)
            for c in (args.concurrency or [1])
        ]
    summaries = []
    for load in loads:
        result = asyncio.run(
            run_load(target, request_stream(items, args.seed), load, seed=args.seed,
                     timeout_s=args.timeout, warmup=args.warmup)
        )  # fmt: skip
        summary = result.summary(_slo(args))
        summaries.append(summary)
        if args.out:
            report.write_json(
                args.out / f"requests-{load.label.replace('/', '_')}.json",
                [r.as_dict() for r in result.results],
            )
    table = report.results_table({args.model: summaries})
    print(table)
    if args.out:
        report.write_json(args.out / "results.json", {"target": args.url, "runs": summaries})
        (args.out / "results.md").write_text(table + "\n", encoding="utf-8")
        if len(loads) > 1:
            report.plot({args.model: summaries}, args.out)
        print(f"results in {args.out}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    model_path = args.model_path or default_model_path()
    items = _items(args, args.tokenizer or str(model_path))
    per_level = {c: args.num_requests or max(16, 4 * c) for c in args.concurrency}
    config = CompareConfig(
        model_path=model_path,
        served_name=args.served_name,
        items=items,
        concurrency=args.concurrency,
        requests_per_level=per_level,
        out_dir=args.out or _default_out("compare"),
        endpoint=args.endpoint,
        max_model_len=args.max_model_len,
        kv_cache_gib=args.kv_cache_gib,
        extra_env=dict(args.env),
        overhead_requests=args.overhead_requests,
        seed=args.seed,
        slo=_slo(args),
        servers=args.servers,
        rounds=args.rounds,
        setup=args.setup,
        ray_replicas=args.ray_replicas,
    )
    payload = run_compare(config)
    print(markdown(payload))
    print(f"results in {config.out_dir}")
    return 0


def _cmd_startup(args: argparse.Namespace) -> int:
    from loadtest import startup

    config = startup.StartupConfig(
        model_path=args.model_path or default_model_path(),
        served_name=args.served_name,
        out_dir=args.out or _default_out("startup"),
        rounds=args.rounds,
        kv_cache_gib=args.kv_cache_gib,
    )
    payload = startup.run_startup(config)
    print(startup.markdown(payload["start_s"]))
    print(f"results in {config.out_dir}")
    return 0


def _cmd_estimate(args: argparse.Namespace) -> int:
    import json

    from loadtest import scaling

    payload = json.loads(args.results.read_text(encoding="utf-8"))
    curve, front_end_cost = scaling.from_results(payload, args.server)
    rows = scaling.estimate(
        curve,
        replicas=args.replicas,
        concurrency=args.concurrency,
        front_end_ms_per_1k_tokens=front_end_cost,
        front_ends=args.front_ends,
    )
    print(
        f"one replica of {args.server}: {curve.r1:.1f} tok/s at c=1, batch saturation "
        f"alpha {curve.alpha:.3f}; front end {front_end_cost:.0f} CPU ms per 1k tokens"
    )
    print(scaling.markdown(rows))
    return 0


def _secret(path: Path | None, variable: str) -> str | None:
    """A key from its file (first line), else from the environment."""
    if path is not None:
        from server.cli.training import read_key_file

        try:
            return read_key_file(path)
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from exc
    return os.environ.get(variable) or None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="load one server (loopback only)")
    run.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    run.add_argument("--model", required=True, help="served model name")
    run.add_argument(
        "--api-key-file",
        type=Path,
        help="a file holding the server's API key (default: ALIGNGATE_API_KEY; a key is never "
        "a flag value, which the process list shows)",
    )
    run.add_argument("--concurrency", type=_ints, help="sweep, e.g. 1,4,16,64")
    run.add_argument("--rate", type=float, help="Poisson arrivals per second instead")
    run.add_argument("--num-requests", type=int, default=64, help="per load level")
    run.add_argument("--duration", type=float, help="seconds per load level (upper bound)")
    run.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    run.add_argument("--warmup", type=int, default=1, help="requests sent before measuring")
    run.add_argument("--out", type=Path, help="folder for JSON, Markdown and plots")
    _workload_args(run)
    run.set_defaults(func=_cmd_run)

    compare = sub.add_parser("compare", help="raw vLLM vs aligngate, side by side")
    compare.add_argument("--model-path", type=Path, help="default: the embedded default model")
    compare.add_argument(
        "--served-name", default="smollm2-135m-instruct", help="the model name both servers serve"
    )
    compare.add_argument(
        "--concurrency", type=_ints, default=[1, 16], help="load levels, e.g. 1,16"
    )
    compare.add_argument(
        "--num-requests", type=int, help="per level (default: max(16, 4 x concurrency))"
    )
    compare.add_argument(
        "--overhead-requests", type=int, default=100, help="1-token requests timing the overhead"
    )
    compare.add_argument(
        "--max-model-len", type=int, default=2048, help="both engines' context length"
    )
    compare.add_argument(
        "--kv-cache-gib", type=int, default=2, help="each engine's CPU KV cache, GiB"
    )
    compare.add_argument(
        "--env", type=_key_value, action="append", default=[], help="KEY=VALUE for both servers"
    )
    compare.add_argument(
        "--servers",
        type=lambda s: s.split(","),
        default=["raw-vllm", "aligngate"],
        help="of raw-vllm, aligngate, aligngate-ray (the gateway on a Ray cluster this "
        "command starts on loopback; strict setup only)",
    )
    compare.add_argument("--ray-replicas", type=int, default=1, help="aligngate-ray's replicas")
    compare.add_argument(
        "--rounds", type=int, default=1, help="alternate the servers' order (ABBA); pooled"
    )
    compare.add_argument(
        "--setup",
        choices=("strict", "default"),
        default="strict",
        help="strict: both from the same plain settings (no LoRA, no storing); default: "
        "`aligngate serve` as users run it (LoRA on, storing on) vs raw vLLM with the same "
        "LoRA and length settings",
    )
    compare.add_argument("--out", type=Path, help="folder for JSON, Markdown and plots")
    _workload_args(compare)
    compare.set_defaults(func=_cmd_compare)

    startup = sub.add_parser(
        "startup", help="start to ready: aligngate serve (preloaded / spawned core), raw vLLM"
    )
    startup.add_argument("--model-path", type=Path, help="default: the embedded default model")
    startup.add_argument(
        "--served-name", default="smollm2-135m-instruct", help="the model name both servers serve"
    )
    startup.add_argument("--rounds", type=int, default=3, help="starts per server")
    startup.add_argument(
        "--kv-cache-gib", type=int, default=2, help="each engine's CPU KV cache, GiB"
    )
    startup.add_argument("--out", type=Path, help="folder for the results")
    startup.set_defaults(func=_cmd_startup)

    estimate = sub.add_parser(
        "estimate", help="throughput vs replicas, from one replica's compare results"
    )
    estimate.add_argument("results", type=Path, help="a compare run's results.json")
    estimate.add_argument(
        "--server", default="aligngate-ray", help="which measured server to scale from"
    )
    estimate.add_argument(
        "--replicas", type=_ints, default=[1, 2, 4, 8], help="replica counts to estimate"
    )
    estimate.add_argument(
        "--concurrency", type=_ints, default=[16, 64], help="load levels to estimate"
    )
    estimate.add_argument(
        "--front-ends", type=int, default=1, help="front-end processes in front of the replicas"
    )
    estimate.set_defaults(func=_cmd_estimate)

    loop = sub.add_parser(
        "loop",
        help="the online loop's benchmark: each method's iterations against a checkable "
        "objective on held-out prompts, and a random-judge null control",
    )
    loop.add_argument(
        "--eval-set", type=Path, default=DEFAULT_EVAL_SET, help="AlpacaEval instructions (JSON)"
    )
    loop.add_argument(
        "--out",
        type=Path,
        default=REPO / "loadtest" / "results" / "loop",
        help="folder for summary.json and the plot",
    )
    loop.add_argument(
        "--methods", default="cut,kto,dpo,quark", help="comma-separated training methods"
    )
    loop.add_argument("--iterations", type=int, default=3, help="iterations per method")
    loop.add_argument("--null-runs", type=int, default=5, help="random-judge control runs")
    loop.add_argument("--train-prompts", type=int, default=48, help="requests per iteration")
    loop.add_argument(
        "--heldout", type=int, default=116, help="held-out prompts (the gate's default size)"
    )
    loop.add_argument("--max-tokens", type=int, default=96, help="cap on each answer's length")
    loop.add_argument(
        "--quick",
        action="store_true",
        help="KTO, one iteration, small sets: the plumbing in minutes (shows no improvement)",
    )
    loop.set_defaults(func=_cmd_loop)

    gate_power = sub.add_parser(
        "gate-power",
        help="simulate the promotion gate: false promotion at 0.50, power at 0.60 (exit 1 "
        "when either misses its target)",
    )
    gate_power.add_argument("--runs", type=int, default=10_000, help="runs per point")
    gate_power.add_argument("--seed", type=int, default=0, help="the simulation's random seed")
    gate_power.add_argument("--size", type=int, help="items per gate (default: the gate's)")
    gate_power.add_argument("--json", action="store_true", help="print JSON, not a table")
    gate_power.set_defaults(func=_cmd_gate_power)
    return parser


def _cmd_loop(args: argparse.Namespace) -> int:
    from loadtest.loop import LoopConfig, run_loop, table

    if not args.eval_set.is_file():
        print(f"loop: {args.eval_set} not found (pass --eval-set)", file=sys.stderr)
        return 2
    if args.quick:
        config = LoopConfig.quick(args.eval_set, args.out)
    else:
        config = LoopConfig(
            eval_set=args.eval_set,
            out=args.out,
            methods=args.methods.split(","),
            iterations=args.iterations,
            null_runs=args.null_runs,
            train_prompts=args.train_prompts,
            heldout=args.heldout,
            max_tokens=args.max_tokens,
        )
    summary = asyncio.run(run_loop(config))
    print(table(summary))
    return 0


def _cmd_gate_power(args: argparse.Namespace) -> int:
    from loadtest.gate_power import markdown, simulate

    result = simulate(runs=args.runs, seed=args.seed, size=args.size)
    print(json.dumps(result, indent=2) if args.json else markdown(result))
    return 0 if result["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (TargetError, WorkloadError, ValueError) as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2
