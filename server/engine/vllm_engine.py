"""One vLLM ``AsyncLLM`` per served model: start, generate token deltas, abort, stop.

Owns: every vLLM import, engine arguments, the translation from
``SamplingSpec`` to ``SamplingParams`` and from ``RequestOutput`` to ``ChoiceDelta``.
Does not know: templates, tokenizers, HTTP.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
import math
import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from server.engine import core_process
from server.engine.scoring_gate import ScoringGate
from server.engine.types import (
    AdapterRef,
    ChoiceDelta,
    EngineStats,
    PromptLogprobs,
    RankedLogprob,
    Replica,
    SamplingRejected,
    SamplingSpec,
    TokenLogprob,
    TopLogprob,
)

log = logging.getLogger(__name__)

# vLLM clamps -inf log-probabilities the same way, so JSON stays valid.
_LOGPROB_FLOOR = -9999.0


@dataclass(frozen=True, slots=True)
class EngineOptions:
    model_path: str
    max_model_len: int | None = None
    dtype: str = "auto"
    seed: int = 0
    served_name: str | None = None  # vLLM's served_model_name (its metrics' model_name)
    # Any further vllm.AsyncEngineArgs field: the platform's defaults, the resource plan's
    # memory share and tensor parallelism, the models file's `engine_args` (decided by the
    # caller; nothing here depends on the platform).
    extra: Mapping[str, Any] = field(default_factory=dict)
    # Environment the engine's processes start with (the plan's CUDA_VISIBLE_DEVICES).
    environment: Mapping[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """``values`` in ``os.environ`` while an engine spawns its processes (which inherit it),
    then as before. Engines that need it start one at a time (the resource plan's order)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class EngineArgumentError(ValueError):
    """An engine argument in the models file that vLLM does not have."""


class AdapterLoadError(ValueError):
    """vLLM refused a LoRA adapter (wrong base, rank above the engine's maximum, ...)."""


def _lora_request(ref: AdapterRef) -> Any:
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=ref.name, lora_int_id=ref.id, lora_path=ref.path)


def _engine_args(options: EngineOptions) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs

    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    unknown = sorted(set(options.extra) - known)
    if unknown:
        raise EngineArgumentError(f"unknown vLLM engine argument(s): {', '.join(unknown)}")
    kwargs: dict[str, Any] = {
        "model": options.model_path,
        "dtype": options.dtype,
        "seed": options.seed,
        "disable_log_stats": True,  # our own stat logger below still receives stats
    }
    if options.max_model_len is not None:
        kwargs["max_model_len"] = options.max_model_len
    if options.served_name is not None:
        kwargs["served_model_name"] = options.served_name
    kwargs.update(options.extra)
    return AsyncEngineArgs(**kwargs)


def _stat_logger_factory(stats: EngineStats, registry: Any) -> Any:
    import prometheus_client
    from vllm.v1.metrics.loggers import PrometheusStatLogger
    from vllm.v1.metrics.perf import PerfMetricsProm
    from vllm.v1.spec_decode.metrics import SpecDecodingProm

    counter = functools.partial(prometheus_client.Counter, registry=registry)

    class _PerfMetrics(PerfMetricsProm):
        _counter_cls = counter

    class _SpecDecoding(SpecDecodingProm):
        _counter_cls = counter

    class _EngineStatLogger(PrometheusStatLogger):
        """vLLM's own Prometheus logger, its ``vllm:*`` series kept in this engine's own
        registry (``registry``), and the scheduler's latest running/waiting counts kept for
        the gateway's ``aligngate_engine_*`` gauges.

        vLLM's logger registers its series in the process-global registry and unregisters
        every ``vllm:`` series there first, so engines started in one process (a models
        file of several) would race (``DuplicateTimeseries``) and wipe each other's. Here
        each engine's series live in its own registry; the gateway's ``/metrics`` merges
        them (``metrics.VllmMetricsCollector``), labelled by model (vLLM's ``model_name``,
        the served name).
        """

        _perf_metrics_cls = _PerfMetrics
        _spec_decoding_cls = _SpecDecoding

        def __init__(self, vllm_config: Any, engine_indexes: list[int] | None = None):
            self._gauge_cls = functools.partial(prometheus_client.Gauge, registry=registry)
            self._counter_cls = counter
            self._histogram_cls = functools.partial(prometheus_client.Histogram, registry=registry)
            super().__init__(vllm_config, engine_indexes)

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):  # type: ignore[no-untyped-def]
            super().record(scheduler_stats, iteration_stats, mm_cache_stats, engine_idx)
            if scheduler_stats is not None:
                stats.running = scheduler_stats.num_running_reqs
                stats.waiting = scheduler_stats.num_waiting_reqs

    return _EngineStatLogger


def _structured_outputs(spec: SamplingSpec) -> Any:
    if spec.structured is None:
        return None
    import json

    from vllm.sampling_params import StructuredOutputsParams

    s = spec.structured
    return StructuredOutputsParams(
        regex=s.regex,
        choice=list(s.choice) if s.choice is not None else None,
        json=json.loads(s.json_schema) if s.json_schema is not None else None,
        json_object=True if s.json_object else None,
    )


def _to_sampling_params(spec: SamplingSpec) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=spec.n,
        max_tokens=spec.max_tokens,
        temperature=spec.temperature,
        top_p=spec.top_p,
        top_k=spec.top_k,
        min_p=spec.min_p,
        seed=spec.seed,
        stop=list(spec.stop) or None,
        stop_token_ids=list(spec.stop_token_ids) or None,
        presence_penalty=spec.presence_penalty,
        frequency_penalty=spec.frequency_penalty,
        repetition_penalty=spec.repetition_penalty,
        min_tokens=spec.min_tokens,
        ignore_eos=spec.ignore_eos,
        logprobs=spec.logprobs,
        prompt_logprobs=spec.prompt_logprobs,
        skip_special_tokens=spec.skip_special_tokens,
        include_stop_str_in_output=spec.include_stop_str_in_output,
        logit_bias=dict(spec.logit_bias) or None,
        output_kind=RequestOutputKind.FINAL_ONLY if spec.final_only else RequestOutputKind.DELTA,
        structured_outputs=_structured_outputs(spec),
    )


def _request_errors() -> tuple[type[Exception], ...]:
    """What vLLM raises for a request it refuses (the request's fault, a 400)."""
    from vllm.exceptions import VLLMClientError

    return (ValueError, VLLMClientError)


async def _chain_first(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    yield first
    async for item in rest:
        yield item


def _finite(x: float) -> float:
    return x if math.isfinite(x) else _LOGPROB_FLOOR


def _logprobs(completion: Any, k: int) -> list[TokenLogprob] | None:
    if completion.logprobs is None:
        return None
    out: list[TokenLogprob] = []
    for token_id, position in zip(completion.token_ids, completion.logprobs, strict=False):
        sampled = position[token_id]
        ranked = sorted(position.values(), key=lambda lp: lp.rank)[:k]
        out.append(
            TokenLogprob(
                token=sampled.decoded_token or "",
                logprob=_finite(sampled.logprob),
                top=tuple(
                    TopLogprob(token=lp.decoded_token or "", logprob=_finite(lp.logprob))
                    for lp in ranked
                ),
            )
        )
    return out


def _prompt_logprobs(positions: Any) -> PromptLogprobs:
    """vLLM's prompt log-probabilities (per position: None, or {token id: Logprob}, the
    prompt's token first), with -inf as -9999.0 as vLLM's server sends it."""
    return [
        None
        if position is None
        else tuple(
            RankedLogprob(
                token_id=token_id,
                token=lp.decoded_token or "",
                logprob=_finite(lp.logprob),
                rank=int(lp.rank) if lp.rank is not None else 0,
            )
            for token_id, lp in position.items()
        )
        for position in positions
    ]


@functools.cache
def _async_llm_class() -> type:
    from vllm.v1.engine.async_llm import AsyncLLM

    class _AsyncLLM(AsyncLLM):
        """AsyncLLM whose finalizer does nothing once we shut it down ourselves: at
        interpreter exit vLLM's ``__del__`` calls shutdown again after its module globals
        are gone and prints ``TypeError: 'NoneType' object is not callable``."""

        aligngate_closed = False

        def __del__(self) -> None:
            if not self.aligngate_closed:
                super().__del__()

    return _AsyncLLM


def check_options(options: EngineOptions) -> None:
    """Refuse engine arguments vLLM does not have, before an engine is started elsewhere
    (a cluster replica) where the error would come back late and far away."""
    _engine_args(options)


class VllmEngine:
    """A running vLLM engine for one model."""

    replicated = False  # one engine, in this process (see ``cluster.ray_engine``)

    def __init__(self, name: str, llm: Any, stats: EngineStats, metrics_registry: Any = None):
        self.name = name
        self._llm = llm
        self.stats = stats
        # vLLM's own ``vllm:*`` series of this engine (a prometheus_client registry).
        self.metrics_registry = metrics_registry
        # With LoRA on, a request's prompt is scored alone in the batch (``scoring_gate``).
        self._scoring_gate = ScoringGate()

    @classmethod
    def start(cls, name: str, options: EngineOptions) -> VllmEngine:
        from prometheus_client import CollectorRegistry

        # The served name labels vLLM's series (``model_name``) as clients name the model.
        args = _engine_args(dataclasses.replace(options, served_name=name))
        stats = EngineStats()
        registry = CollectorRegistry(auto_describe=True)
        core_process.install()  # the core forks from the preloaded process where it can
        with _environment(options.environment):
            llm = _async_llm_class().from_engine_args(
                args, stat_loggers=[_stat_logger_factory(stats, registry)]
            )
        return cls(name, llm, stats, registry)

    @property
    def max_model_len(self) -> int:
        return int(self._llm.model_config.max_model_len)

    @property
    def healthy(self) -> bool:
        return not self._llm.errored and not self._llm.is_stopped

    @property
    def serving_replicas(self) -> int:
        """Engines behind this one (admission admits ``max_pending_requests`` per each)."""
        return 1

    def start_output_handler(self) -> None:
        """Start vLLM's output-handler task now, on the running loop, in an empty context.
        The engine was built in a worker thread (no loop there), so vLLM would start it
        inside the first request, and the task would keep that request's context for good:
        its id on every later log line of the handler, its span as vLLM spans' parent."""
        start = getattr(self._llm, "_run_output_handler", None)  # vLLM's, private
        if start is not None:
            contextvars.Context().run(start)

    @property
    def status(self) -> str:
        """``ok`` or ``down`` (an engine of several replicas may also be ``degraded``)."""
        return "ok" if self.healthy else "down"

    def num_unfinished(self) -> int:
        return int(self._llm.get_num_unfinished_requests())

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        spec: SamplingSpec,
        adapter: AdapterRef | None = None,
        on_replica: Callable[[Replica], None] | None = None,
        trace_headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[list[ChoiceDelta]]:
        """Yield, per engine step, the deltas of the choices that moved; with ``adapter``,
        the request runs with that (loaded) LoRA. ``on_replica`` is for engines of several
        replicas (``cluster.ray_engine``); this one is no replica and never calls it.
        ``trace_headers`` (W3C): the span vLLM's own request span is a child of, when the
        engine traces (``otlp_traces_endpoint``).

        Closing the iterator early (client gone) aborts the request in the engine.
        """
        try:
            params = _to_sampling_params(spec)
        except ValueError as exc:  # vLLM's own checks of the parameters
            raise SamplingRejected(str(exc)) from exc
        k = spec.logprobs or 0
        finished = False
        alone = spec.prompt_logprobs is not None and self.lora_enabled
        await self._scoring_gate.enter(alone)
        stream = self._llm.generate(
            {"prompt_token_ids": prompt_token_ids},
            params,
            request_id,
            lora_request=_lora_request(adapter) if adapter is not None else None,
            trace_headers=trace_headers,
        )
        try:
            try:
                first = await anext(stream)
            except _request_errors() as exc:  # refused on admission, e.g. a bad regex
                raise SamplingRejected(str(exc)) from exc
            except StopAsyncIteration:
                return
            finally:
                if alone:  # scored (or refused): others may join the batch
                    alone = False
                    await self._scoring_gate.scored()
            async for out in _chain_first(first, stream):
                # vLLM sends the prompt's scores with the first output, and an empty list
                # with each later delta (which must not replace them).
                scored = getattr(out, "prompt_logprobs", None)
                prompt = _prompt_logprobs(scored) if scored else None
                if prompt is not None and not out.outputs:  # scored before any token
                    yield [ChoiceDelta(index=0, text="", token_ids=[], prompt_logprobs=prompt)]
                    continue
                yield [
                    ChoiceDelta(
                        index=c.index,
                        text=c.text,
                        token_ids=list(c.token_ids),
                        logprobs=_logprobs(c, k) if spec.logprobs is not None else None,
                        finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason,
                        prompt_logprobs=prompt,
                    )
                    for c in out.outputs
                ]
                finished = out.finished
        finally:
            await stream.aclose()
            if not finished:
                await self.abort(request_id)
            await self._scoring_gate.leave(alone_still=alone)

    @property
    def lora_enabled(self) -> bool:
        return self._llm.vllm_config.lora_config is not None

    @property
    def max_lora_rank(self) -> int:
        config = self._llm.vllm_config.lora_config
        return int(config.max_lora_rank) if config is not None else 0

    async def add_adapter(self, ref: AdapterRef) -> None:
        """Load a LoRA into the engine (validated now, not on the first request)."""
        try:
            added = await self._llm.add_lora(_lora_request(ref))
        except Exception as exc:  # vLLM raises plain ValueError/RuntimeError from its worker
            raise AdapterLoadError(f"vLLM could not load adapter {ref.name!r}: {exc}") from exc
        if added is False:
            raise AdapterLoadError(f"vLLM did not load adapter {ref.name!r}")

    async def remove_adapter(self, ref: AdapterRef) -> None:
        await self._llm.remove_lora(ref.id)

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)

    async def check_health(self) -> None:
        await self._llm.check_health()

    def shutdown(self) -> None:
        self._llm.shutdown()
        self._llm.aligngate_closed = True


def offline_generate(
    options: EngineOptions, prompts: list[list[int]], spec: SamplingSpec
) -> tuple[list[list[int]], float]:
    """vLLM's own offline ``LLM`` on pre-rendered token ids: the raw-engine baseline of the
    batch benchmark. Returns each prompt's output token ids and the generation seconds."""
    import gc
    import time

    from vllm import LLM

    args = _engine_args(options)
    kwargs = {
        k: v
        for k, v in vars(args).items()
        if k
        in {
            "model",
            "dtype",
            "seed",
            "enforce_eager",
            "max_model_len",
            "trust_remote_code",
            "gpu_memory_utilization",
            "tensor_parallel_size",
        }
    }
    with _environment(options.environment):
        llm = LLM(**kwargs, disable_log_stats=True)
    params = _to_sampling_params(spec)
    from vllm.sampling_params import RequestOutputKind

    params.output_kind = RequestOutputKind.FINAL_ONLY
    try:
        started = time.perf_counter()
        outputs = llm.generate(
            [{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False
        )
        seconds = time.perf_counter() - started
        return [list(o.outputs[0].token_ids) for o in outputs], seconds
    finally:
        del llm
        gc.collect()
