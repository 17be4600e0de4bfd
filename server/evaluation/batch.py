"""AlpacaEval generation at engine speed: every instruction rendered by the served model's
own renderer, all submitted to vLLM at once (continuous batching), written in alpaca_eval's
``model_outputs`` format.

Owns: reading instruction files, resumable progress (finished items are appended to a
``.partial.jsonl`` beside the output and skipped by a rerun), the final atomic write, the
summary. The same work can go to a running gateway over HTTP (``--server``).
Does not know: SQL, HTTP routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.engine.types import SamplingSpec
from server.models.registry import ServedModel
from server.models.render import Message
from server.serving.generation import new_id
from server.serving.tokenizing import off_loop
from server.telemetry.progress import Progress as Bar

log = logging.getLogger(__name__)

OFFICIAL_DATASET = ("tatsu-lab/alpaca_eval", "alpaca_eval")
DEFAULT_MAX_TOKENS = 2048  # the CUT repo's generate.py and alpaca_eval's configs


class BatchInputError(ValueError):
    """The instructions cannot be read (a clear message for the user)."""


@dataclass(frozen=True, slots=True)
class Item:
    index: int
    instruction: str
    dataset: str | None


@dataclass(slots=True)
class Output:
    index: int
    instruction: str
    output: str
    generator: str
    dataset: str | None
    finish_reason: str | None
    tokens: int

    def public(self) -> dict[str, Any]:
        """The alpaca_eval model_outputs record (dataset kept when the input had it)."""
        record: dict[str, Any] = {
            "instruction": self.instruction,
            "output": self.output,
            "generator": self.generator,
        }
        if self.dataset is not None:
            record["dataset"] = self.dataset
        return record


@dataclass
class Summary:
    items: int = 0
    generated: int = 0
    resumed: int = 0
    output_tokens: int = 0
    seconds: float = 0.0
    finish_reasons: Counter[str] = field(default_factory=Counter)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.finish_reasons.items()))
        return (
            f"{self.items} items ({self.generated} generated, {self.resumed} resumed), "
            f"{self.output_tokens} output tokens in {self.seconds:.1f} s = "
            f"{self.tokens_per_s:.1f} tok/s; finish reasons: {reasons}"
        )


def load_instructions(path: Path | None, limit: int | None = None) -> list[Item]:
    """A JSON list or JSONL of objects with ``instruction`` (and optionally ``dataset``)."""
    if path is None:
        rows = _official_eval_set()
    else:
        try:
            text = path.read_text()
        except OSError as exc:
            raise BatchInputError(f"cannot read {path}: {exc}") from exc
        try:
            rows = (
                json.loads(text)
                if text.lstrip().startswith("[")
                else [json.loads(line) for line in text.splitlines() if line.strip()]
            )
        except json.JSONDecodeError as exc:
            raise BatchInputError(f"{path} is neither a JSON list nor JSONL: {exc}") from exc
    if not isinstance(rows, list) or not rows:
        raise BatchInputError(f"{path}: expected a non-empty list of objects")
    items = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str):
            raise BatchInputError(f"{path}: item {i} has no string `instruction`")
        if not row["instruction"].strip():
            raise BatchInputError(f"{path}: item {i} has an empty `instruction`")
        dataset = row.get("dataset")
        items.append(Item(i, row["instruction"], dataset if isinstance(dataset, str) else None))
    return items[:limit] if limit is not None else items


def _official_eval_set() -> list[dict[str, Any]]:
    try:
        import datasets  # type: ignore[import-untyped]

        rows = datasets.load_dataset(*OFFICIAL_DATASET, trust_remote_code=False)["eval"]
        return [dict(r) for r in rows]
    except Exception as exc:
        raise BatchInputError(
            "could not load the official AlpacaEval set with the `datasets` library "
            f"({type(exc).__name__}); pass the instructions with --instructions FILE "
            "(a JSON list of {instruction, dataset})"
        ) from exc


class Progress:
    """Finished items, appended one JSON line each, so an interrupted run loses nothing."""

    def __init__(self, out: Path):
        self.path = out.with_name(out.name + ".partial.jsonl")

    def load(self, items: list[Item], generator: str) -> dict[int, Output]:
        done: dict[int, Output] = {}
        if not self.path.exists():
            return done
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the interruption
            i = row.get("index")
            if (
                not isinstance(i, int)
                or i >= len(items)
                or items[i].instruction != row["instruction"]
            ):
                raise BatchInputError(
                    f"{self.path} belongs to another input file; remove it to start over"
                )
            if row.get("generator") == generator:
                done[i] = Output(**row)
        return done

    def append(self, output: Output) -> None:
        line = json.dumps(dataclasses.asdict(output), ensure_ascii=False)
        with self.path.open("a") as f:
            f.write(line + "\n")  # one write per line: a crash cuts at most the last one
            f.flush()

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def write_atomically(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(records, f, ensure_ascii=False, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


Generate = Callable[[Item], Awaitable[tuple[str, str | None, int]]]


async def run_batch(
    items: list[Item], out: Path, generator: str, generate: Generate, *, concurrency: int | None
) -> Summary:
    """Generate every item not already done, append each as it finishes, then write the
    alpaca_eval file in input order."""
    out.parent.mkdir(parents=True, exist_ok=True)
    progress = Progress(out)
    done = progress.load(items, generator)
    todo = [item for item in items if item.index not in done]
    summary = Summary(items=len(items), resumed=len(done))
    bar = Bar("alpaca-eval", len(items), unit="req", initial=len(done))
    semaphore = asyncio.Semaphore(concurrency) if concurrency else None
    started = time.perf_counter()

    async def one(item: Item) -> None:
        if semaphore is not None:
            async with semaphore:
                text, reason, tokens = await generate(item)
        else:
            text, reason, tokens = await generate(item)
        output = Output(
            item.index, item.instruction, text.strip(), generator, item.dataset, reason, tokens
        )
        progress.append(output)
        done[item.index] = output
        summary.generated += 1
        summary.output_tokens += tokens
        summary.finish_reasons[reason or "unknown"] += 1
        bar.update(1)
        elapsed = time.perf_counter() - started
        bar.note(f"{summary.output_tokens / elapsed:.0f} out tok/s")

    try:
        await asyncio.gather(*(one(item) for item in todo))
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - started
    write_atomically(out, [done[item.index].public() for item in items])
    progress.remove()
    return summary


def batch_spec(
    model: ServedModel, *, max_tokens: int | None, temperature: float | None
) -> Callable[[int], SamplingSpec]:
    """Sampling for a batch: the flags, else the model's defaults (the models file, the
    generation config, the family's — alpaca_eval's configs for these checkpoints use the
    family's — as ``models.decoding`` orders them), else greedy with up to 2048 new tokens
    as the CUT repo's generate.py; capped by the room left in the context."""
    family = model.renderer.spec
    defaults = model.decoding
    wanted = max_tokens or defaults.get("max_tokens") or DEFAULT_MAX_TOKENS
    temp = temperature if temperature is not None else defaults.get("temperature")
    top_p = defaults.get("top_p") if temperature is None else None

    def spec_for(prompt_len: int) -> SamplingSpec:
        room = model.max_model_len - prompt_len
        if room < 1:
            raise BatchInputError(f"an instruction fills the {model.max_model_len}-token context")
        return SamplingSpec(
            max_tokens=min(wanted, room),
            temperature=0.0 if temp is None else temp,
            top_p=1.0 if top_p is None else top_p,
            stop=tuple(family.stop),
            final_only=True,
        )

    return spec_for


def engine_generator(model: ServedModel, spec_for: Callable[[int], SamplingSpec]) -> Generate:
    """Generation through the served model's renderer and engine (the server's path)."""

    async def generate(item: Item) -> tuple[str, str | None, int]:
        messages = [Message("user", item.instruction)]
        prompt = await off_loop(len(item.instruction), model.renderer.render_chat, messages)
        spec = spec_for(len(prompt.token_ids))
        text, tokens, reason = "", 0, None
        async for deltas in model.engine.generate(
            new_id("batch"), prompt.token_ids, spec, adapter=model.adapter
        ):
            for d in deltas:
                text += d.text
                tokens += len(d.token_ids)
                reason = d.finish_reason or reason
        return text, reason, tokens

    return generate


def server_generator(
    url: str, model: str, *, max_tokens: int | None, temperature: float | None, timeout: float
) -> tuple[Generate, Callable[[], Awaitable[None]]]:
    """The same work sent to a running gateway over HTTP."""
    import httpx

    client = httpx.AsyncClient(base_url=url.rstrip("/"), timeout=timeout)

    async def generate(item: Item) -> tuple[str, str | None, int]:
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": item.instruction}],
            "store": False,
        }
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if temperature is not None:
            body["temperature"] = temperature
        response = await client.post("/v1/chat/completions", json=body)
        if response.status_code != 200:
            raise BatchInputError(f"{url} answered {response.status_code}: {response.text}")
        data = response.json()
        choice = data["choices"][0]
        return (
            choice["message"]["content"],
            choice["finish_reason"],
            data["usage"]["completion_tokens"],
        )

    return generate, client.aclose
