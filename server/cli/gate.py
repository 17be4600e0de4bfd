"""``aligngate gate decide``: the promotion gate's rule on counts given on standard input,
one JSON object per line (``{"wins", "losses", "ties", "unreadable"?, "flips"?}``), a
decision per line out. What ``python -m loadtest gate-power`` simulates against, so the
simulation checks the gateway's own rule, not a copy of it.

Owns: the command's input and output. The rule is ``evaluation.gate_rule``'s.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys

from server.settings import Settings

log = logging.getLogger("aligngate")


def _cmd_decide(args: argparse.Namespace, settings: Settings) -> int:
    from server.evaluation.gate import DEFAULT_SIZE
    from server.evaluation.gate_rule import GateRule, decide

    rule = GateRule(mode=args.mode, margin=args.margin)
    decide_once = functools.cache(decide)  # simulations repeat the same counts
    if args.defaults:
        print(json.dumps({"size": DEFAULT_SIZE, **rule.__dict__}))
        return 0
    for number, line in enumerate(sys.stdin, start=1):
        if not line.strip():
            continue
        try:
            counts = json.loads(line)
            decision = decide_once(
                int(counts["wins"]),
                int(counts["losses"]),
                int(counts["ties"]),
                rule,
                unreadable=int(counts.get("unreadable", 0)),
                flips=int(counts.get("flips", 0)),
            )
        except (ValueError, KeyError, TypeError) as exc:
            log.error("line %d: expected {wins, losses, ties}: %s", number, exc)
            return 2
        print(json.dumps({"promoted": decision.promoted, "decided": decision.decided}))
    return 0


def add_gate_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    gate = sub.add_parser("gate", help="the promotion gate's rule")
    gate_sub = gate.add_subparsers(dest="gate_command", required=True)
    decide = gate_sub.add_parser(
        "decide",
        help="decide counts read from stdin (JSON lines of wins, losses, ties), one "
        "decision per line",
    )
    decide.add_argument(
        "--mode",
        default="superiority",
        choices=["superiority", "non-inferiority"],
        help="superiority: the lower bound above 0.5; non-inferiority: above 0.5 - margin",
    )
    decide.add_argument(
        "--margin", type=float, default=0.05, help="non-inferiority margin (default 0.05)"
    )
    decide.add_argument(
        "--defaults", action="store_true", help="print the gate's default size and rule"
    )
    decide.set_defaults(func=_cmd_decide)
