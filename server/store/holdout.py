"""The held-out share of a model's traffic: completions chosen by a hash of their id, never
in a training window or an export, kept for evaluating what the training made (the
promotion gate's default instructions).

A completion is held out when the first 8 bytes of SHA-256(id), read as a fraction of 2^64,
fall below the share: a fixed choice (the same id is held out every time, on every front
end), independent of content, about ``share`` of the traffic.

Owns: the rule (the store selects by it; exports and the gate ask it). Does not know:
models, training.
"""

from __future__ import annotations

import hashlib


def holdout_fraction(completion_id: str) -> float:
    digest = hashlib.sha256(completion_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def held_out(completion_id: str, share: float) -> bool:
    return share > 0 and holdout_fraction(completion_id) < share
