"""``python -m loadtest loop``: does the online loop make the model better? For each training
method, iterations of serve → judge → train → gate → hot-load, through the gateway's own
HTTP API and online loop, with a rule code can check as the objective
(``examples/loop_objective.py``, served as function judges), measured after every
iteration on held-out prompts; and a null control whose judges answer at random.

Prompts: AlpacaEval's 805 instructions, shuffled once (seed 0): the first ``heldout``
are the held-out set (the objective is measured on them, and the gate judges on them),
the rest feed training traffic, a fresh slice per iteration.

Per method, one gateway: the default model (Quark: its Quark copy) with the method as its
``online.method``, an ``objective`` judge of the kind the method trains on (CUT: judgments,
KTO: scores thresholded to labels, DPO: pairwise on ``n = 2`` requests, Quark: scores as
rewards) sampling all traffic, and a pairwise ``gatekeeper`` for the promotion gate. Each
iteration: ``train_prompts`` requests to ``base@latest`` → the judge labels them → ``POST
/admin/align`` on the version that answered → the gate on the held-out prompts. The gate
answers every held-out prompt greedily with both sides and keeps the answers beside the
candidate (``gate.json``): the objective rate of the candidate (and, in the first
iteration, of the base) is measured on those answers, with a bootstrap 95 % interval.

The null control, run first: the same loop (DPO) with both judges answering at random, ``null_runs``
iterations on one gateway, each training a fresh adapter from the base on its own traffic
while nothing is promoted: nothing may be promoted (the gate's own simulation bounds it at
5 %: ``python -m loadtest gate-power``).

Owns: the benchmark. Speaks to the gateway over HTTP, reads the gate's answers from the
adapters folder it gave the gateway; imports nothing from ``server``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from loadtest.servers import RunningServer, ServerSpec, engine_env, gateway

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
OBJECTIVE_FILE = EXAMPLES / "loop_objective.py"
MODEL = "base"
# The objective judge's function and verdict, per method (examples/loop_objective.py).
JUDGE_OF = {
    "cut": ("judgment", "judgment"),
    "kto": ("score", "score"),
    "dpo": ("pairwise", "pairwise"),
    "quark": ("score", "score"),
}
NULL_FIELDS = ("wins", "losses", "ties", "flips", "p_value", "decided", "promoted", "reason")
RANDOM_OF = {"judgment": "random_judgment", "score": "random_score", "pairwise": "random_pairwise"}


@dataclass
class LoopConfig:
    eval_set: Path
    out: Path
    methods: list[str] = field(default_factory=lambda: ["cut", "kto", "dpo", "quark"])
    iterations: int = 3
    null_runs: int = 5
    train_prompts: int = 48
    heldout: int = 116  # the gate's default size: it judges every held-out prompt
    max_tokens: int = 96
    temperature: float = 0.8
    concurrency: int = 16
    kv_cache_gib: int = 2
    # The served model's dtype. float32: on a CPU without bf16 instructions (AVX2 only, as
    # this benchmark's 2-core machine) vLLM emulates bf16; float32 decodes 2.7× faster at
    # batch 16 (115 vs 42 tok/s) and 3.2× at 32 (159 vs 50), 0.66× at batch 1 — the gate and
    # the traffic here are batches.
    dtype: str = "float32"
    seed: int = 0

    @classmethod
    def quick(cls, eval_set: Path, out: Path) -> LoopConfig:
        """One method, one iteration, small sets: the plumbing in minutes (a smoke test,
        it shows nothing about improvement)."""
        return cls(
            eval_set=eval_set,
            out=out,
            methods=["kto"],
            iterations=1,
            null_runs=0,
            train_prompts=12,
            heldout=12,
        )


def load_objective() -> Any:
    """The rule, from the examples file (the same code the gateway's judges run)."""
    spec = importlib.util.spec_from_file_location("loop_objective", OBJECTIVE_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def split_prompts(eval_set: Path, heldout: int, seed: int) -> tuple[list[str], list[str]]:
    rows = json.loads(eval_set.read_text())
    instructions = [row["instruction"] for row in rows]
    random.Random(seed).shuffle(instructions)
    return instructions[:heldout], instructions[heldout:]


def bootstrap_rate(hits: list[bool], resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    values = np.asarray(hits, dtype=float)
    if values.size == 0:
        return {"rate": 0.0, "low": 0.0, "high": 0.0, "n": 0}
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, (resamples, values.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {
        "rate": round(float(values.mean()), 4),
        "low": round(float(low), 4),
        "high": round(float(high), 4),
        "n": int(values.size),
    }


def models_file(folder: Path, method: str, config: LoopConfig, *, null: bool) -> Path:
    import yaml

    role, function = JUDGE_OF[method]
    target = RANDOM_OF[role] if null else function
    gate_target = "random_pairwise" if null else "pairwise"
    path = "builtin:smollm2-135m-instruct" + ("-quark" if method == "quark" else "")
    document = {
        "models": [
            {
                "name": MODEL,
                "path": path,
                "max_model_len": 2048,
                "dtype": config.dtype,
                "store": True,
                "lora": {},
                "online": {"method": method, "holdout": 0},
            }
        ],
        "judges": [
            {
                "name": "objective",
                "kind": "function",
                "target": f"loop_objective:{target}",
                "verdict": role,
                "sample": 1.0,
                "requests_per_minute": 100_000,
                "queue_size": 100_000,
            },
            {
                "name": "gatekeeper",
                "kind": "function",
                "target": f"loop_objective:{gate_target}",
                "verdict": "pairwise",
                "requests_per_minute": 100_000,
            },
        ],
    }
    file = folder / "models.yaml"
    file.write_text(yaml.safe_dump(document, sort_keys=False))
    return file


class Gateway:
    """One ``aligngate serve`` of the loop's models file, reached over loopback HTTP."""

    def __init__(self, folder: Path, method: str, config: LoopConfig, *, null: bool):
        env = engine_env(config.kv_cache_gib, {})
        env |= {
            "ALIGNGATE_DATABASE_URL": f"sqlite:///{folder / 'store.db'}",
            "ALIGNGATE_ADAPTERS_DIR": str(folder / "adapters"),
            # The objective judge's verdicts train unreviewed: the benchmark is its only user.
            "ALIGNGATE_TRUSTED_ANNOTATORS": "judge-objective",
            "ALIGNGATE_FEEDBACK_PER_MINUTE": "0",
            "PYTHONPATH": str(EXAMPLES),
        }
        self.adapters = folder / "adapters"
        self.adapters.mkdir(parents=True, exist_ok=True)
        spec: ServerSpec = gateway(models_file(folder, method, config, null=null), env)
        self.server = RunningServer(spec, folder / "serve.log")
        self.url = spec.base_url
        self.ready_s = self.server.wait_ready(MODEL, timeout_s=600)
        self.client = httpx.AsyncClient(base_url=self.url, timeout=600, trust_env=False)

    async def close(self) -> None:
        await self.client.aclose()
        self.server.stop()

    async def answers(
        self,
        model: str,
        prompts: list[str],
        *,
        n: int,
        temperature: float,
        max_tokens: int,
        store: bool,
        concurrency: int,
    ) -> list[list[str]]:
        limit = asyncio.Semaphore(concurrency)

        async def one(prompt: str) -> list[str]:
            body = {
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "temperature": temperature,
                "n": n,
                "store": store,
            }
            async with limit:
                response = await self.client.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            return [c["message"]["content"] or "" for c in response.json()["choices"]]

        return list(await asyncio.gather(*(one(p) for p in prompts)))

    async def objective(
        self, model: str, prompts: list[str], meets: Callable[[str], bool], config: LoopConfig
    ) -> dict[str, float]:
        """``model``'s greedy answers to ``prompts`` (not stored): the share meeting the rule,
        with its bootstrap interval."""
        outputs = await self.answers(
            model,
            prompts,
            n=1,
            temperature=0.0,
            max_tokens=config.max_tokens,
            store=False,
            concurrency=config.concurrency,
        )
        return bootstrap_rate([meets(o[0]) for o in outputs], seed=config.seed)

    def gate_outputs(self, candidate: str) -> list[dict[str, Any]] | None:
        """The gate's answers (both sides, greedy, on the held-out prompts), from the
        ``gate.json`` it wrote beside the candidate; None when the gate did not run."""
        file = self.adapters / candidate / "gate.json"
        if not file.is_file():
            return None
        return list(json.loads(file.read_text()).get("outputs") or [])

    async def judged(self) -> int:
        """Verdicts (and unreadable replies) of the objective judge so far, from /metrics."""
        text = (await self.client.get("/metrics")).text
        total = 0.0
        for line in text.splitlines():
            if (
                line.startswith(
                    ("aligngate_judge_verdicts_total{", "aligngate_judge_errors_total{")
                )
                and 'judge="objective"' in line
            ):
                total += float(line.rsplit(" ", 1)[1])
        return int(total)

    async def wait_judged(self, expected: int, timeout_s: float = 600) -> int:
        deadline = time.monotonic() + timeout_s
        done = await self.judged()
        for _ in range(int(timeout_s / 0.5)):  # polled: the judges run in the server
            if done >= expected or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
            done = await self.judged()
        await asyncio.sleep(1.5)  # the store's group commit
        return done

    async def current_version(self) -> str:
        card = (await self.client.get(f"/v1/models/{MODEL}@latest")).json()
        return str(card.get("alias_of") or MODEL)

    async def align(self, version: str, heldout_file: Path, gate_size: int, max_tokens: int) -> Any:
        body = {
            "model": version,
            "gate": {
                "judge": "gatekeeper",
                "instructions": str(heldout_file),
                "size": gate_size,
                "max_tokens": max_tokens,
            },
        }
        started = await self.client.post("/admin/align", json=body)
        if started.status_code != 202:
            return {"status": "failed", "error": started.text, "timings": {}}
        job_id = started.json()["id"]
        while True:
            job = (await self.client.get(f"/admin/align/{job_id}")).json()
            if job["status"] in ("succeeded", "failed"):
                return job
            await asyncio.sleep(1)


async def _iteration(
    gw: Gateway,
    method: str,
    config: LoopConfig,
    prompts: list[str],
    heldout: list[str],
    heldout_file: Path,
    meets: Callable[[str], bool],
    *,
    measure: bool,
) -> dict[str, Any]:
    timings: dict[str, float] = {}
    version = await gw.current_version()
    started = time.perf_counter()
    n = 2 if method == "dpo" else 1
    before = await gw.judged()
    await gw.answers(
        f"{MODEL}@latest",
        prompts,
        n=n,
        temperature=config.temperature,
        max_tokens=config.max_tokens,
        store=True,
        concurrency=config.concurrency,
    )
    timings["serve_s"] = round(time.perf_counter() - started, 2)
    started = time.perf_counter()
    await gw.wait_judged(before + len(prompts))
    timings["judge_s"] = round(time.perf_counter() - started, 2)
    started = time.perf_counter()
    job = await gw.align(version, heldout_file, len(heldout), config.max_tokens)
    timings["align_s"] = round(time.perf_counter() - started, 2)
    timings |= {f"job_{k}": v for k, v in (job.get("timings") or {}).items()}
    result: dict[str, Any] = {
        "trained_from": version,
        "status": job["status"],
        "error": job.get("error"),
        "candidate": job.get("adapter"),
        "examples": job.get("examples"),
        "promoted": bool(job.get("promoted")),
        "gate": job.get("gate"),
        "train": {
            k: (job.get("train") or {}).get(k)
            for k in ("steps", "loss_before", "loss_after", "metrics", "seconds")
        },
    }
    outputs = gw.gate_outputs(str(job["adapter"])) if job["status"] == "succeeded" else None
    if measure and outputs:
        result["objective"] = bootstrap_rate(
            [meets(o["candidate"]) for o in outputs], seed=config.seed
        )
        result["incumbent_objective"] = bootstrap_rate(
            [meets(o["incumbent"]) for o in outputs], seed=config.seed
        )
    elif measure and job["status"] == "succeeded":  # the gate did not run: ask the candidate
        started = time.perf_counter()
        result["objective"] = await gw.objective(str(job["adapter"]), heldout, meets, config)
        timings["measure_s"] = round(time.perf_counter() - started, 2)
    result["timings"] = timings
    return result


async def _method_run(
    method: str,
    config: LoopConfig,
    train: list[str],
    heldout: list[str],
    heldout_file: Path,
    meets: Callable[[str], bool],
    *,
    null: bool,
    iterations: int,
) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix=f"aligngate-loop-{method}-"))
    started = time.perf_counter()
    gw = Gateway(folder, method, config, null=null)
    run: dict[str, Any] = {"method": method, "null": null, "ready_s": round(gw.ready_s, 2)}
    try:
        run["iterations"] = []
        for k in range(iterations):
            start = k * config.train_prompts
            prompts = train[start : start + config.train_prompts]
            if len(prompts) < config.train_prompts:
                raise ValueError("not enough training prompts for these iterations")
            result = await _iteration(
                gw, method, config, prompts, heldout, heldout_file, meets, measure=not null
            )
            result["iteration"] = k + 1
            run["iterations"].append(result)
            if not null and "base" not in run:
                # The first gate's incumbent is the base: its answers are the base's rate.
                run["base"] = result.pop("incumbent_objective", None) or await gw.objective(
                    MODEL, heldout, meets, config
                )
                print(json.dumps({"method": method, "base": run["base"]}), flush=True)
            print(json.dumps({"method": method, "null": null, **result}, default=str), flush=True)
    finally:
        await gw.close()
        shutil.rmtree(folder, ignore_errors=True)
    run["total_s"] = round(time.perf_counter() - started, 2)
    return run


async def run_loop(config: LoopConfig) -> dict[str, Any]:
    objective = load_objective()
    heldout, train = split_prompts(config.eval_set, config.heldout, config.seed)
    config.out.mkdir(parents=True, exist_ok=True)
    heldout_file = config.out / "heldout.json"
    heldout_file.write_text(json.dumps([{"instruction": p} for p in heldout], indent=1))
    started = time.perf_counter()
    summary: dict[str, Any] = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "objective": (objective.__doc__ or "").strip().splitlines()[0],
        "methods": {},
    }
    summary_file = config.out / "summary.json"

    def save(complete: bool) -> None:
        # Written after every method too: a run stopped early keeps what it measured.
        summary["complete"] = complete
        summary["total_s"] = round(time.perf_counter() - started, 1)
        summary_file.write_text(json.dumps(summary, indent=2, default=str))

    # The null control: one gateway, ``null_runs`` iterations from the base (nothing is
    # promoted unless the gate errs), each on its own fresh traffic.
    nulls = []
    if config.null_runs:
        nulls.append(
            await _method_run(
                "dpo",
                config,
                train,
                heldout,
                heldout_file,
                objective.meets,
                null=True,
                iterations=config.null_runs,
            )
        )
    summary["null_control"] = {
        "runs": sum(len(run["iterations"]) for run in nulls),
        "promoted": sum(it["promoted"] for run in nulls for it in run["iterations"]),
        "decisions": [
            {k: (it.get("gate") or {}).get(k) for k in NULL_FIELDS}
            for run in nulls
            for it in run["iterations"]
        ],
        "timings": [it["timings"] for run in nulls for it in run["iterations"]],
        "total_s": sum(run["total_s"] for run in nulls),
    }
    save(complete=False)
    for method in config.methods:
        summary["methods"][method] = await _method_run(
            method,
            config,
            train,
            heldout,
            heldout_file,
            objective.meets,
            null=False,
            iterations=config.iterations,
        )
        save(complete=False)
    save(complete=True)
    plot(summary, config.out / "objective.png")
    return summary


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, run in summary["methods"].items():
        points = [run["base"]] + [it.get("objective") for it in run["iterations"]]
        xs = [i for i, p in enumerate(points) if p]
        rates = [points[i]["rate"] for i in xs]
        ax.plot(xs, rates, marker="o", label=method)
        ax.fill_between(
            xs, [points[i]["low"] for i in xs], [points[i]["high"] for i in xs], alpha=0.15
        )
        for i, it in zip(xs[1:], run["iterations"], strict=False):
            if it["promoted"]:
                ax.annotate("promoted", (i, points[i]["rate"]), fontsize=7)
    most = max((len(run["iterations"]) for run in summary["methods"].values()), default=0)
    ax.set_xticks(range(most + 1))
    ax.set_xlabel("iteration (0: the base model)")
    ax.set_ylabel("objective rate on held-out prompts")
    ax.set_title("Does the online loop make the model better? (95 % bootstrap intervals)")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(summary: dict[str, Any]) -> str:
    most = max((len(run["iterations"]) for run in summary["methods"].values()), default=0)
    rows = [
        "| method | base | " + " | ".join(f"iteration {k}" for k in range(1, most + 1)) + " |",
        "|---|---|" + "---|" * most,
    ]

    def cell(point: dict[str, Any] | None) -> str:
        return f"{point['rate']:.2f} [{point['low']:.2f}, {point['high']:.2f}]" if point else "–"

    for method, run in summary["methods"].items():
        cells = [cell(run.get("base"))]
        for it in run["iterations"]:
            mark = " promoted" if it["promoted"] else ""
            cells.append(
                cell(it.get("objective")) + mark if it["status"] == "succeeded" else "failed"
            )
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    null = summary.get("null_control") or {}
    rows.append("")
    rows.append(f"Null control: {null.get('promoted', 0)} of {null.get('runs', 0)} runs promoted.")
    return "\n".join(rows)
