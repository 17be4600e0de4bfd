"""The models file's `cluster:` section and a model's replica settings, as plain data.

Owns: their schema and the Ray Serve deployment options that follow from them (a plain
function, tested without a cluster). Does not know: Ray itself, engines, HTTP.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Autoscaling(BaseModel):
    """Ray Serve's autoscaling for one model: replicas between ``min`` and ``max``, aiming at
    ``target_ongoing_requests`` requests in flight per replica."""

    model_config = ConfigDict(extra="forbid")

    min: int = Field(default=1, ge=0, le=1024)
    max: int = Field(ge=1, le=1024)
    target_ongoing_requests: float = Field(default=16, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.min > self.max:
            raise ValueError("autoscaling: min must not exceed max")
        return self


class TrainingTask(BaseModel):
    """Where an online iteration trains on the cluster: a Ray task with these resources,
    on whichever node has them (its adapters root must be the front ends' one)."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(default=1, ge=0)
    # None: one GPU when the cluster has any (the trainer then runs on it), else none.
    num_gpus: float | None = Field(default=None, ge=0)
    # The longest a run may take, waiting for a node included: then it is cancelled and the
    # iteration fails, releasing its lock (a task no node can take would wait forever).
    timeout_s: float = Field(default=7200, gt=0, le=7 * 24 * 3600)


# Ray Serve's request router for every model (``routing``): power of two choices with a
# first choice for a request's cached prefix or loaded adapter.
ROUTER_CLASS = "server.cluster.routing.AffinityRouter"


class Routing(BaseModel):
    """How Ray Serve picks a replica for each request (``routing.AffinityRouter``)."""

    model_config = ConfigDict(extra="forbid")

    # Prefer the replica that holds a request's prompt prefix (a conversation's earlier
    # turns: its KV cache) or, failing that, its adapter; false: power of two choices only.
    affinity: bool = True
    # ... unless that replica has more than this many requests beyond the least busy one.
    max_imbalance: int = Field(default=8, ge=0, le=1_000_000)


class ClusterSettings(BaseModel):
    """The models file's `cluster:` section: serve every model as a Ray Serve deployment
    on an existing Ray cluster instead of in this process."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["ray"] = "ray"
    # Where the cluster is: "auto" (the cluster this machine belongs to, as `ray start`
    # recorded it) or "HOST:PORT" of its head (GCS). Not Ray Client ("ray://HOST:PORT"):
    # the gateway must run on a node of the cluster (``_no_ray_client``).
    address: str = Field(default="auto", min_length=1)
    namespace: str = Field(default="aligngate", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    # How often Ray Serve checks each replica (its engine's own health check) and how long
    # a check may take before the replica is replaced.
    health_check_period_s: float = Field(default=2.0, gt=0, le=600)
    health_check_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    # Without shared streams, a replica may send a stream's tokens in batches, at most one
    # per this many ms (the first token at once); 0 (the default) sends every engine step
    # on its own. Ray Serve LLM batches every 50 ms; on this one-node CPU cluster that
    # measured no gain and coarser inter-token gaps (loadtest/README.md).
    stream_interval_ms: float = Field(default=0.0, ge=0, le=1000)
    # A replica sends a front end the steps of all its requests on whichever of their
    # streams is free, about one object per engine step instead of one per request
    # (``shared_streams``); false: each request's steps on its own stream (then
    # ``stream_interval_ms`` applies).
    shared_streams: bool = True
    routing: Routing = Field(default_factory=Routing)
    training: TrainingTask = Field(default_factory=TrainingTask)
    # How long a replica being stopped (scale-down, redeploy, shutdown) keeps serving the
    # requests it holds before Ray Serve stops it: they finish, new ones go elsewhere.
    graceful_shutdown_s: float = Field(default=30.0, ge=0, le=3600)

    @model_validator(mode="after")
    def _no_ray_client(self) -> ClusterSettings:
        if self.address.startswith("ray://"):
            raise ValueError(
                f"address {self.address!r}: Ray Client (ray://) cannot carry the streaming "
                "deployment handles the gateway reads engines' tokens through; run the "
                "gateway on a node of the cluster and give `auto` or the head's HOST:PORT"
            )
        return self


def shared_store_problem(store_url: str) -> str | None:
    """Why a store cannot hold a cluster's shared state, or None: SQLite is one file on one
    machine, and a cluster's front ends and jobs (on any node) share one database."""
    if store_url.startswith("sqlite"):
        return (
            "a `cluster:` section needs PostgreSQL for the state its front ends share "
            "(ALIGNGATE_DATABASE_URL=postgresql+psycopg://USER@HOST:5432/DB); SQLite is a "
            "file on one machine"
        )
    return None


def deployment_options(
    *,
    name: str,
    cluster: ClusterSettings,
    replicas: int | None,
    autoscaling: Autoscaling | None,
    num_cpus: float | None,
    num_gpus: float | None,
    max_ongoing_requests: int,
    max_queued_requests: int | None = None,
) -> dict[str, Any]:
    """Ray Serve ``Deployment.options`` for one model's engine.

    Replicas: a fixed count (default 1) or Serve's autoscaling. Resources: what the models
    file says, else one CPU per replica and no GPU. On a CPU node a replica's CPUs are also
    its engine's threads: Ray sets an actor's `OMP_NUM_THREADS` to its `num_cpus`, and
    vLLM's CPU backend computes with that many OpenMP threads. ``max_ongoing_requests`` is
    the gateway's own bound per engine (Serve's default of 5 would leave vLLM's batch nearly
    empty). Routing: the project's router (``ROUTER_CLASS``) with the `routing:` settings."""
    options: dict[str, Any] = {
        "name": name,
        "ray_actor_options": {
            "num_cpus": 1.0 if num_cpus is None else num_cpus,
            "num_gpus": 0.0 if num_gpus is None else num_gpus,
        },
        "max_ongoing_requests": max_ongoing_requests,
        # Past the replicas' max_ongoing_requests, queue this many (Serve's BackPressureError
        # beyond: the front end's 429); -1, Serve's default: no limit of its own.
        "max_queued_requests": -1 if max_queued_requests is None else max_queued_requests,
        "health_check_period_s": cluster.health_check_period_s,
        "health_check_timeout_s": cluster.health_check_timeout_s,
        # Requests in flight finish first (Serve sends new ones elsewhere meanwhile).
        "graceful_shutdown_timeout_s": cluster.graceful_shutdown_s,
        "request_router_config": {
            "request_router_class": ROUTER_CLASS,
            "request_router_kwargs": {
                "affinity_enabled": cluster.routing.affinity,
                "max_imbalance": cluster.routing.max_imbalance,
            },
        },
    }
    if autoscaling is not None:
        options["autoscaling_config"] = {
            "min_replicas": autoscaling.min,
            "max_replicas": autoscaling.max,
            "target_ongoing_requests": autoscaling.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = replicas or 1
    return options


def unplaceable(resources: dict[str, float], cluster: dict[str, float]) -> str | None:
    """Why a task asking for ``resources`` can never start on a cluster whose totals are
    ``cluster`` (Ray's names: CPU, GPU), or None."""
    names = {"num_cpus": "CPU", "num_gpus": "GPU"}
    short = [
        f"{amount:g} {names[key]} (the cluster has {cluster.get(names[key], 0.0):g})"
        for key, amount in resources.items()
        if amount > cluster.get(names[key], 0.0)
    ]
    if not short:
        return None
    return "the training task asks for " + " and ".join(short) + ": no node can run it"


def training_resources(task: TrainingTask, cluster_gpus: float) -> dict[str, float]:
    """Ray task options for one training run: what the models file asks for, else one GPU
    when the cluster has one (training wants it most) and none otherwise."""
    gpus = task.num_gpus if task.num_gpus is not None else (1.0 if cluster_gpus >= 1 else 0.0)
    return {"num_cpus": task.num_cpus, "num_gpus": gpus}
