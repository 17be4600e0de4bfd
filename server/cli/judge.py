"""``aligngate judge``: an AI judge of the models file over stored completions.

Prints one summary (judged, stored, unparseable, failed, ties, requests, tokens, seconds);
exit status 0 when the run finished (unparseable replies are a result, not a failure), 2 for
a bad argument or models file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from server.settings import Settings

log = logging.getLogger("aligngate")


def add_judge_command(sub: Any) -> None:
    judge = sub.add_parser("judge", help="judge stored completions with an AI judge")
    judge.add_argument("--config", type=Path, help="models file with a `judges:` section")
    judge.add_argument("--model", required=True, help="served model whose completions to judge")
    judge.add_argument("--judge", required=True, help="a judge's name in the models file")
    judge.add_argument(
        "--sample", type=float, default=1.0, help="fraction of the completions to judge (1)"
    )
    judge.add_argument("--since", help="only completions from this time on (ISO-8601 or epoch)")
    judge.add_argument("--limit", type=int, help="at most N completions")
    judge.add_argument("--concurrency", type=int, default=4, help="completions in flight (4)")
    judge.add_argument("--seed", type=int, help="seed of the sampling (default: random)")
    judge.set_defaults(func=_cmd_judge)


def _cmd_judge(args: argparse.Namespace, settings: Settings) -> int:
    from server.evaluation.judge_runs import judge_stored
    from server.evaluation.judges import build_judge
    from server.feedback.service import parse_since
    from server.models.models_file import (
        ModelsFileError,
        default_deployment,
        load_deployment,
    )
    from server.store import Store

    if not 0 < args.sample <= 1:
        log.error("--sample must be in (0, 1]")
        return 2
    if args.limit is not None and args.limit < 1:
        log.error("--limit must be 1 or more")
        return 2
    try:
        since = parse_since(args.since)
        config = args.config or settings.config
        deployment = load_deployment(config) if config else default_deployment()
        entry = next((j for j in deployment.judges if j.name == args.judge), None)
        if entry is None:
            names = ", ".join(j.name for j in deployment.judges) or "none"
            log.error("no judge %r in the models file (it has: %s)", args.judge, names)
            return 2
        judge = build_judge(entry, self_url=f"http://{_loopback(settings.host)}:{settings.port}/v1")
    except (ValueError, ModelsFileError) as exc:
        log.error("%s", exc)
        return 2
    store = Store.open(settings.store_url())
    try:
        summary = asyncio.run(
            judge_stored(
                store,
                judge,
                model=args.model,
                sample=args.sample,
                since=since,
                limit=args.limit,
                concurrency=args.concurrency,
                seed=args.seed,
                show_progress=True,
            )
        )
    finally:
        store.close()
    print(json.dumps(summary.to_json()))
    log.info(
        "judge %s on %s: %d completion(s), %d judged, %d stored (%d ties), %d unparseable, "
        "%d failed; %d request(s), %d+%d tokens, %.1f s",
        summary.judge,
        args.model,
        summary.completions,
        summary.judged,
        summary.stored,
        summary.ties,
        summary.unparseable,
        summary.failed,
        summary.requests,
        summary.prompt_tokens,
        summary.completion_tokens,
        summary.seconds,
    )
    return 0


def _loopback(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
