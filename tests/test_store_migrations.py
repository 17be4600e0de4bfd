"""The store's schema as Alembic revisions (issue 30): a fresh database gets every revision,
a database made before Alembic is stamped with the hand-written migrations it recorded and
goes on from there, and processes starting together on one database apply each revision
once (PostgreSQL's advisory lock, a file lock beside SQLite), on real databases."""

from __future__ import annotations

import multiprocessing
import time

from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from server.store.database import alembic_config, migrate, open_engine
from server.store.schema import MIGRATIONS, migrations_table

REVISIONS = [
    r.revision
    for r in reversed(list(ScriptDirectory.from_config(alembic_config()).walk_revisions()))
]


def _version(url: str) -> str:
    engine = open_engine(url)
    try:
        with engine.connect() as conn:
            return str(conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one())
    finally:
        engine.dispose()


def test_the_revisions_are_todays_migrations_in_order() -> None:
    assert [name.split("_", 1)[0] for name, _ in MIGRATIONS] == REVISIONS


def test_a_fresh_database_gets_every_revision_once(store_url: str) -> None:
    engine = open_engine(store_url)
    try:
        assert migrate(engine) == REVISIONS
        assert migrate(engine) == []
        tables = set(inspect(engine).get_table_names())
        assert {"completions", "feedback", "battles", "judge_calls", "alembic_version"} <= tables
        assert migrations_table.name not in tables  # Alembic's record, not the old one
    finally:
        engine.dispose()
    assert _version(store_url) == REVISIONS[-1]


def test_a_database_from_before_alembic_is_stamped_and_goes_on(store_url: str) -> None:
    engine = open_engine(store_url)
    try:
        with engine.begin() as conn:  # as the hand-written runner left it after m004
            migrations_table.create(conn)
            for name, apply in MIGRATIONS[:4]:
                apply(conn)
                conn.execute(migrations_table.insert().values(name=name, applied_at=0.0))
        assert migrate(engine) == REVISIONS[4:]
        columns = {c["name"] for c in inspect(engine).get_columns("feedback")}
        assert {"reward", "request_id"} <= columns  # m006, m007
    finally:
        engine.dispose()
    assert _version(store_url) == REVISIONS[-1]


def _migrate_in_a_process(url: str, start_at: float, results: multiprocessing.Queue) -> None:
    time.sleep(max(0.0, start_at - time.time()))
    engine = open_engine(url)
    try:
        results.put(migrate(engine))
    except Exception as exc:  # reported to the test, not lost in the child
        results.put(f"{type(exc).__name__}: {exc}")
    finally:
        engine.dispose()


def test_processes_starting_together_apply_each_revision_once(store_url: str) -> None:
    """Three processes (front ends, replicas) open one fresh database at the same moment:
    one applies the revisions, the others wait for the lock and find nothing to do."""
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue = context.Queue()
    start_at = time.time() + 8  # after every child has imported the store
    children = [
        context.Process(target=_migrate_in_a_process, args=(store_url, start_at, results))
        for _ in range(3)
    ]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=30)
    assert all(isinstance(o, list) for o in outcomes), outcomes
    assert sorted(outcomes, key=len) == [[], [], REVISIONS]
    assert _version(store_url) == REVISIONS[-1]
