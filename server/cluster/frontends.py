"""Which front ends use which Ray Serve applications: several `aligngate serve` processes
with the same models file share one cluster's applications, and only the last to leave
deletes them.

The rule: a front end *joins* each of its models' applications before using it. The first
member deploys it (replacing a leftover one: it is the only user) and records the settings
it deployed with; a later member attaches to the running application as it was deployed
(its own settings, if they differ, are ignored and the differences logged: changing them
takes every front end to restart). On shutdown a member *leaves*; the last to leave deletes
the application. A front end that died without leaving is dropped the next time anyone
joins or leaves: members are Ray job ids, and the cluster knows which jobs are dead.

The book is one detached Ray actor per namespace (its calls run one at a time, so join and
leave are atomic across front ends); it lives as long as the cluster and holds no engine.

Owns: the membership rule and the book. Does not know: engines, replicas, HTTP.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

BOOK = "aligngate-frontends"


class Membership:
    """The book itself: application → the job ids of the front ends using it. Plain class
    (tested without Ray); ``book`` wraps it as the actor."""

    def __init__(self) -> None:
        self._members: dict[str, set[str]] = {}
        self._settings: dict[str, dict[str, Any]] = {}

    def join(
        self, app: str, member: str, dead: list[str], settings: dict[str, Any] | None = None
    ) -> bool:
        """Add ``member`` to ``app``; True when it is the only one (it deploys, with
        ``settings``, which the book keeps for the members that attach later)."""
        members = self._members.setdefault(app, set())
        members.difference_update(dead)
        members.add(member)
        first = members == {member}
        if first:
            self._settings[app] = settings or {}
        return first

    def deployed_with(self, app: str) -> dict[str, Any]:
        """The settings ``app``'s first member deployed it with."""
        return self._settings.get(app, {})

    def leave(self, app: str, member: str, dead: list[str]) -> bool:
        """Remove ``member`` from ``app``; True when nobody is left (it deletes)."""
        members = self._members.get(app, set())
        members.difference_update([*dead, member])
        if not members:
            self._members.pop(app, None)
            self._settings.pop(app, None)
            return True
        return False

    def members(self, app: str) -> list[str]:
        return sorted(self._members.get(app, set()))


def book(namespace: str) -> Any:
    """The namespace's book (created by the first front end to ask)."""
    import ray

    actor = ray.remote(num_cpus=0, max_concurrency=1)(Membership)
    return actor.options(
        name=BOOK, namespace=namespace, lifetime="detached", get_if_exists=True
    ).remote()


def me() -> str:
    """This front end's member id: its Ray job (driver) id."""
    import ray

    return str(ray.get_runtime_context().get_job_id())


def dead_members() -> list[str]:
    """Job ids the cluster reports dead (front ends that stopped without leaving)."""
    try:
        from ray._private import state

        return [job["JobID"] for job in state.jobs() if job.get("IsDead")]
    except Exception as exc:  # an internal API: without it, nobody is pruned
        log.warning("Could not list Ray jobs: %s", exc)
        return []


def differences(mine: dict[str, Any], deployed: dict[str, Any], prefix: str = "") -> list[str]:
    """Where this front end's settings differ from those ``app`` was deployed with, as
    dotted paths (``deployment.num_replicas``)."""
    out = []
    for key in sorted(set(mine) | set(deployed)):
        a, b = mine.get(key), deployed.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {b!r} deployed, {a!r} here")
    return out
