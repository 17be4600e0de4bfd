"""``aligngate bench alpaca-eval``: the batch generator against raw vLLM and against a
sequential transformers ``generate`` loop (the CUT repo's scripts/generate.py), in one run,
on the same rendered prompts and greedy sampling.

(a) ``aligngate alpaca-eval``'s path: renderer + AsyncLLM, all prompts submitted at once.
(b) vLLM's offline ``LLM.generate`` on the same token ids.
(c) transformers ``model.generate`` one instruction at a time, on a small subset.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.engine.vllm_engine import offline_generate
from server.evaluation.batch import Item, batch_spec, engine_generator, run_batch
from server.models.models_file import ModelEntry
from server.models.registry import Registry, engine_options
from server.models.render import Message
from server.resources.platform import engine_defaults
from server.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Leg:
    name: str
    items: int
    output_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def _hf_loop(path: str, prompts: list[list[int]], max_new_tokens: int, eos: int | None) -> Leg:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    model.eval()
    tokens = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(
                torch.tensor([ids]),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )
            tokens += out.shape[1] - len(ids)
    return Leg(
        "transformers generate, sequential", len(prompts), tokens, time.perf_counter() - started
    )


def bench_alpaca_eval(
    entry: ModelEntry, settings: Settings, items: list[Item], *, max_tokens: int, hf_items: int
) -> dict[str, Any]:
    registry = Registry()

    async def gateway_leg() -> tuple[Leg, list[list[int]], Any, str]:
        try:
            await registry.start([entry], settings)
            model = registry.get(entry.name)
            spec_for = batch_spec(model, max_tokens=max_tokens, temperature=0.0)
            with tempfile.TemporaryDirectory() as tmp:
                summary = await run_batch(
                    items,
                    Path(tmp) / "out.json",
                    entry.name,
                    engine_generator(model, spec_for),
                    concurrency=None,
                )
            prompts = [
                model.renderer.render_chat([Message("user", it.instruction)]).token_ids
                for it in items
            ]
            leg = Leg("aligngate alpaca-eval", len(items), summary.output_tokens, summary.seconds)
            eos = model.renderer.tokenizer.eos_token_id
            return leg, prompts, spec_for(max(len(p) for p in prompts)), (model.path, eos)
        finally:
            registry.shutdown()

    gateway, prompts, spec, (path, eos) = asyncio.run(gateway_leg())
    # The raw engine gets what the gateway's engine got: platform defaults, memory share.
    assert registry.plan is not None
    placed = registry.plan.engine(entry.name)
    platform = registry.plan.platform
    options = engine_options(entry, path, placed, engine_defaults(platform), platform)
    outputs, seconds = offline_generate(options, prompts, spec)
    raw = Leg("vLLM LLM.generate (offline)", len(prompts), sum(len(o) for o in outputs), seconds)
    hf = _hf_loop(path, prompts[:hf_items], max_tokens, eos)
    legs = [gateway, raw, hf]
    return {
        "max_tokens": max_tokens,
        "legs": [
            {
                "name": leg.name,
                "items": leg.items,
                "output_tokens": leg.output_tokens,
                "seconds": round(leg.seconds, 2),
                "tokens_per_s": round(leg.tokens_per_s, 1),
            }
            for leg in legs
        ],
        "a_over_b": round(gateway.tokens_per_s / raw.tokens_per_s, 3),
        "a_over_c": round(gateway.tokens_per_s / hf.tokens_per_s, 2),
    }
