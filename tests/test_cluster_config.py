"""The models file's `cluster:` section and what it makes of each model on Ray Serve,
checked without a cluster: the schema, the deployment options, the health rule, and the
rule by which several front ends share the applications."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.cluster.config import (
    Autoscaling,
    ClusterSettings,
    TrainingTask,
    deployment_options,
    training_resources,
    unplaceable,
)
from server.cluster.frontends import Membership, differences
from server.cluster.ray_engine import ReplicaHealth, app_name
from server.models.models_file import ModelsFileError, load_deployment


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(text)
    return path


def test_a_file_without_cluster_serves_in_one_process(tmp_path: Path) -> None:
    text = "models:\n  - {name: m, path: builtin:smollm2-135m-instruct, replicas: 3}\n"
    deployment = load_deployment(write(tmp_path, text))
    assert deployment.cluster is None
    assert deployment.models[0].replicas == 3  # kept, unused without `cluster:`


def test_cluster_section_and_replica_settings(tmp_path: Path) -> None:
    deployment = load_deployment(
        write(
            tmp_path,
            """
cluster: {backend: ray, address: "head:6379", namespace: prod}
models:
  - {name: a, path: builtin:smollm2-135m-instruct, replicas: 2, num_cpus: 4, num_gpus: 1,
     gpu_memory_utilization: 0.45, max_queued_requests: 32}
  - name: b
    path: builtin:smollm2-135m-instruct
    autoscaling: {min: 1, max: 8, target_ongoing_requests: 32}
""",
        )
    )
    assert deployment.cluster == ClusterSettings(address="head:6379", namespace="prod")
    a, b = deployment.models
    options = deployment_options(
        name=a.name,
        cluster=deployment.cluster,
        replicas=a.replicas,
        autoscaling=a.autoscaling,
        num_cpus=a.num_cpus,
        num_gpus=a.num_gpus,
        max_ongoing_requests=128,
        max_queued_requests=a.max_queued_requests,
    )
    assert options["num_replicas"] == 2
    assert options["ray_actor_options"] == {"num_cpus": 4, "num_gpus": 1}
    assert options["max_ongoing_requests"] == 128
    assert options["graceful_shutdown_timeout_s"] == 30  # requests in flight finish first
    assert options["max_queued_requests"] == 32  # past it: BackPressureError, a 429
    assert "autoscaling_config" not in options
    # The entry's GPU share goes to each replica's engine (Ray places it: no plan).
    from server.models.registry import engine_options

    assert engine_options(a, a.path, None, {}, None).extra["gpu_memory_utilization"] == 0.45
    assert "gpu_memory_utilization" not in engine_options(b, b.path, None, {}, None).extra
    scaled = deployment_options(
        name=b.name,
        cluster=deployment.cluster,
        replicas=b.replicas,
        autoscaling=b.autoscaling,
        num_cpus=None,
        num_gpus=None,
        max_ongoing_requests=64,
    )
    assert scaled["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 8,
        "target_ongoing_requests": 32,
    }
    assert "num_replicas" not in scaled
    assert scaled["max_queued_requests"] == -1  # Serve's default: the admission bounds it
    # One CPU per replica by default (Ray's accounting: two replicas fit two cores).
    assert scaled["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    # The project's router, with prefix and adapter affinity on by default.
    assert options["request_router_config"] == {
        "request_router_class": "server.cluster.routing.AffinityRouter",
        "request_router_kwargs": {"affinity_enabled": True, "max_imbalance": 8},
    }
    plain = ClusterSettings(routing={"affinity": False, "max_imbalance": 2})
    kwargs = deployment_options(
        name="c", cluster=plain, replicas=1, autoscaling=None, num_cpus=None, num_gpus=None,
        max_ongoing_requests=8,
    )["request_router_config"]["request_router_kwargs"]  # fmt: skip
    assert kwargs == {"affinity_enabled": False, "max_imbalance": 2}


def test_training_runs_as_a_task_with_a_gpu_when_the_cluster_has_one(tmp_path: Path) -> None:
    default = ClusterSettings().training
    assert training_resources(default, cluster_gpus=0) == {"num_cpus": 1, "num_gpus": 0.0}
    assert training_resources(default, cluster_gpus=4) == {"num_cpus": 1, "num_gpus": 1.0}
    asked = TrainingTask(num_cpus=8, num_gpus=2)
    assert training_resources(asked, cluster_gpus=0) == {"num_cpus": 8, "num_gpus": 2}
    models = "models:\n  - {name: m, path: x}\n"
    text = "cluster: {training: {num_cpus: 2, num_gpus: 0}}\n" + models
    cluster = load_deployment(write(tmp_path, text)).cluster
    assert cluster is not None and cluster.training == TrainingTask(num_cpus=2, num_gpus=0)
    with pytest.raises(ModelsFileError, match="num_gpu"):  # a misspelt field is refused
        load_deployment(write(tmp_path, "cluster: {training: {num_gpu: 1}}\n" + models))
    # A task no node could take fails at once rather than waiting (its iteration holds the
    # model's training lock); one that can waits at most `timeout_s` (default 2 h).
    assert default.timeout_s == 7200
    cpu_only = {"CPU": 4.0}
    assert unplaceable(training_resources(default, 0), cpu_only) is None
    assert unplaceable(training_resources(asked, 0), cpu_only) == (
        "the training task asks for 8 CPU (the cluster has 4) and 2 GPU (the cluster has 0): "
        "no node can run it"
    )


def test_ray_client_addresses_are_refused_with_the_reason(tmp_path: Path) -> None:
    models = "models:\n  - {name: m, path: x}\n"
    with pytest.raises(ModelsFileError, match=r"Ray Client \(ray://\) cannot carry the streaming"):
        load_deployment(write(tmp_path, 'cluster: {address: "ray://head:10001"}\n' + models))


@pytest.mark.parametrize(
    "bad, says",
    [
        ("cluster: {backend: kubernetes}\n", "backend"),
        ("cluster: {adress: auto}\n", "adress"),
        ("cluster: {routing: {max_imbalance: -1}}\n", "max_imbalance"),
        ("cluster: {routing: {afinity: true}}\n", "afinity"),
        ("cluster: {}\nmodels_extra: 1\n", "models_extra"),
    ],
)
def test_cluster_section_is_checked(tmp_path: Path, bad: str, says: str) -> None:
    text = bad + "models:\n  - {name: m, path: builtin:smollm2-135m-instruct}\n"
    with pytest.raises(ModelsFileError, match=says):
        load_deployment(write(tmp_path, text))


def test_replicas_or_autoscaling_and_no_devices_on_a_cluster(tmp_path: Path) -> None:
    both = "models:\n  - name: m\n    path: x\n    replicas: 2\n    autoscaling: {max: 3}\n"
    with pytest.raises(ModelsFileError, match="replicas or autoscaling"):
        load_deployment(write(tmp_path, both))
    placed = "cluster: {}\nmodels:\n  - {name: m, path: x, devices: [0]}\n"
    with pytest.raises(ModelsFileError, match="num_gpus"):
        load_deployment(write(tmp_path, placed))
    with pytest.raises(ValueError, match="min must not exceed max"):
        Autoscaling(min=4, max=2)


def test_health_is_degraded_with_some_replicas_down() -> None:
    assert ReplicaHealth(running=2, wanted=2, reachable=True).status == "ok"
    assert ReplicaHealth(running=1, wanted=2, reachable=True).status == "degraded"
    assert ReplicaHealth(running=2, wanted=2, reachable=True, unhealthy=True).status == ("degraded")
    assert ReplicaHealth(running=0, wanted=2, reachable=True).status == "down"
    assert ReplicaHealth(running=2, wanted=2, reachable=False).status == "down"
    # Autoscaled to zero is not down: Ray Serve starts a replica for the next request.
    assert ReplicaHealth(running=0, wanted=0, reachable=True).status == "ok"


def test_application_names_are_safe_for_any_model_name() -> None:
    assert app_name("aligngate", "org/model:v1") == "aligngate-org_model_v1"


def test_front_ends_share_applications_and_the_last_to_leave_deletes() -> None:
    book = Membership()
    assert book.join("app", "fe1", dead=[])  # the first deploys
    assert not book.join("app", "fe2", dead=[])  # the second attaches
    assert not book.join("app", "fe2", dead=[])  # joining twice changes nothing
    assert not book.leave("app", "fe1", dead=[])  # fe2 still uses it: keep it
    assert book.members("app") == ["fe2"]
    assert book.leave("app", "fe2", dead=[])  # the last one deletes
    assert book.members("app") == []


def test_a_front_end_that_died_without_leaving_is_dropped() -> None:
    book = Membership()
    book.join("app", "crashed", dead=[])
    # Its job is dead: the next front end is alone, so it deploys (replacing the leftover).
    assert book.join("app", "fe2", dead=["crashed"])
    book.join("app", "fe3", dead=[])
    book.join("other", "fe3", dead=[])
    # fe3 dies; fe2 leaving is then the last use of `app`.
    assert book.leave("app", "fe2", dead=["fe3"])
    assert book.members("other") == ["fe3"]  # pruned only where someone joins or leaves


def test_a_front_end_that_attaches_learns_how_the_application_was_deployed() -> None:
    book = Membership()
    deployed = {"deployment": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 1}}}
    assert book.join("app", "fe1", dead=[], settings={**deployed, "wanted": 2})
    mine = {"deployment": {"num_replicas": 4, "ray_actor_options": {"num_cpus": 1}}, "wanted": 4}
    assert not book.join("app", "fe2", dead=[], settings=mine)  # attaches: not recorded
    assert book.deployed_with("app") == {**deployed, "wanted": 2}
    assert differences(mine, book.deployed_with("app")) == [
        "deployment.num_replicas: 2 deployed, 4 here",
        "wanted: 2 deployed, 4 here",
    ]
    assert differences(mine, mine) == []
    book.leave("app", "fe1", dead=[])
    book.leave("app", "fe2", dead=[])
    assert book.deployed_with("app") == {}  # deleted with its last member


def test_an_unreachable_replica_is_retried_not_declared_dead() -> None:
    """Ray's ActorUnavailableError (a replica that cannot be reached for now) sends the
    request again before any output, as a death does, without declaring the replica dead;
    after output, the request ends with an error saying which it was."""
    from types import SimpleNamespace

    from ray.exceptions import ActorDiedError, ActorUnavailableError
    from ray.serve.exceptions import BackPressureError

    from server.cluster.ray_engine import RayEngine, _Retry
    from server.errors import EngineUnavailable, Overloaded

    pokes: list[str] = []
    engine = RayEngine.__new__(RayEngine)  # its failure rule only: no cluster behind it
    engine.name = "m"
    engine._cluster = SimpleNamespace(poke=lambda: pokes.append("poke"))
    unreachable = ActorUnavailableError("connection lost", b"a" * 16)
    assert isinstance(engine._failure(unreachable, None, started=False), _Retry)
    after = engine._failure(unreachable, None, started=True)
    assert isinstance(after, EngineUnavailable) and "could not be reached" in str(after)
    assert pokes == []  # not a death: the replicas are not looked over
    died = engine._failure(ActorDiedError(), None, started=True)
    assert isinstance(died, EngineUnavailable) and "stopped during the request" in str(died)
    assert pokes == ["poke"]
    # Past the replicas' queue (max_queued_requests): OpenAI's 429, not Serve's plain 503.
    full = engine._failure(BackPressureError(33, 32), None, started=False)
    assert isinstance(full, Overloaded) and full.status_code == 429


def test_admission_scales_with_the_replicas_serving() -> None:
    """A front end admits `max_pending_requests` per replica serving the model, as Ray
    Serve last reported them (one at least), not per front end."""
    from types import SimpleNamespace

    from server.cluster.ray_engine import RayEngine
    from server.models.models_file import ModelEntry
    from server.serving.generation import admission_limit
    from server.settings import Settings

    running = {"n": 2}
    cluster = SimpleNamespace(health=lambda app: ReplicaHealth(running=running["n"], wanted=2))
    engine = RayEngine.__new__(RayEngine)  # what the controller reported: no cluster here
    engine.app, engine._cluster = "aligngate-m", cluster
    model = SimpleNamespace(entry=ModelEntry(name="m", path="x", max_pending_requests=16))
    model.engine = engine
    assert admission_limit(model, Settings()) == 32  # type: ignore[arg-type]
    running["n"] = 0  # none serving for now: one replica's worth (the 503 is health's)
    assert admission_limit(model, Settings()) == 16  # type: ignore[arg-type]
    model.entry = ModelEntry(name="m", path="x")
    running["n"] = 3
    assert admission_limit(model, Settings(max_pending_requests=4)) == 12  # type: ignore[arg-type]


def test_a_cluster_refuses_sqlite_at_check_and_at_start(
    tmp_path: Path, test_env: dict[str, str]
) -> None:
    """A cluster's front ends share state through the database: SQLite (a file on one
    machine) is refused by `aligngate check` and before `serve` starts anything."""
    from server.app import build_app
    from server.settings import Settings
    from tests.conftest import run_cli

    entry = "  - {name: m, path: builtin:smollm2-135m-instruct}\n"
    models = write(tmp_path, "cluster: {address: auto}\nmodels:\n" + entry)
    sqlite = Settings(database_url=f"sqlite:///{tmp_path / 'store.db'}")
    deployment = load_deployment(models)
    with pytest.raises(ModelsFileError, match="needs PostgreSQL for the state its front ends"):
        build_app(sqlite, deployment.models, cluster=deployment.cluster)
    env = {**test_env, "ALIGNGATE_DATABASE_URL": sqlite.store_url()}
    checked = run_cli(["check", "--config", str(models)], env, timeout=120)
    assert checked.returncode == 2 and "needs PostgreSQL" in checked.stderr, checked.stderr
