"""The ``aligngate`` command line: serve, default-model.

Owns: argument parsing and logging set-up. Starting vLLM spawns processes, which is why
everything runs under ``main()`` (the console script is the ``__main__`` guard).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from server.settings import Settings

log = logging.getLogger("aligngate")


def _cmd_default_model(args: argparse.Namespace, settings: Settings) -> int:
    from server.default_model import ensure_default_model

    print(ensure_default_model(settings.models_dir))
    return 0


def _cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from server.app import build_app
    from server.registry import ModelsFileError, default_entries, load_models_file

    config: Path | None = args.config or settings.config
    try:
        entries = load_models_file(config) if config else default_entries()
    except ModelsFileError as exc:
        log.error("%s", exc)
        return 2
    app = build_app(settings, entries)
    config = uvicorn.Config(
        app,
        host=args.host or settings.host,
        port=args.port if args.port is not None else settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=30,
    )
    server = _GracefulServer(config)
    server.run()
    return 0 if server.started else 1


class _GracefulServer(uvicorn.Server):
    """uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, so the process dies
    by the signal; a completed graceful stop should exit 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            self._captured_signals.clear()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aligngate", description="Serving gateway for aligned checkpoints."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve models over the OpenAI-compatible HTTP API")
    serve.add_argument("--config", type=Path, help="models file (YAML); default: embedded model")
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default 8000)")
    serve.set_defaults(func=_cmd_serve)

    default = sub.add_parser(
        "default-model", help="convert the embedded SmolLM2 model once; print its folder"
    )
    default.set_defaults(func=_cmd_default_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return int(args.func(args, settings))


if __name__ == "__main__":
    sys.exit(main())
