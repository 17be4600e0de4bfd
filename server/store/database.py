"""Opening the database: SQLite (default, a file under the data directory) or PostgreSQL by
URL, with the durability settings that make an acknowledged write a write on disk.

Owns: engine creation, connection pragmas, bringing the schema up to date (Alembic's
revisions in ``server/store/migrations``, once, under a lock every starting process takes).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, inspect, select, text
from sqlalchemy.engine import make_url

from server.store.locks import lock_key
from server.store.schema import MIGRATIONS, migrations_table

log = logging.getLogger(__name__)

MIGRATION_LOCK = "schema-migrations"
_migrating_here = threading.Lock()


def sqlite_url(home: Path) -> str:
    return f"sqlite:///{home / 'aligngate.db'}"


def open_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            # SQLAlchemy, not pysqlite, begins transactions (``_begin``): pysqlite begins one
            # only before a write, so a SAVEPOINT first in a transaction would start (and its
            # RELEASE commit) a transaction of its own (SQLAlchemy's documented recipe).
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            # WAL: readers never block the writer. synchronous=FULL: a commit returns only
            # after the WAL is fsynced, so an acknowledged write survives a crash.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(conn):  # type: ignore[no-untyped-def]
            conn.exec_driver_sql("BEGIN")

        return engine
    if parsed.get_backend_name() == "postgresql":
        # PostgreSQL's default synchronous_commit=on already fsyncs the WAL on commit.
        return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
    raise ValueError(
        f"unsupported database URL {parsed.render_as_string()!r} (sqlite or postgresql)"
    )


def alembic_config() -> Config:
    """The store's Alembic configuration: its revisions, no ini file, no URL of its own."""
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
    return config


@contextlib.contextmanager
def migration_lock(engine: Engine) -> Iterator[None]:
    """Held while the schema is brought up to date, so that processes starting together
    (front ends, replicas) apply each revision once: PostgreSQL's session advisory lock
    (waited for; the next holder finds nothing left to do), a file lock beside a SQLite
    database."""
    with _migrating_here:
        if engine.dialect.name == "postgresql":
            with engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": lock_key(MIGRATION_LOCK)})
                conn.commit()
                try:
                    yield
                finally:
                    conn.execute(
                        text("SELECT pg_advisory_unlock(:k)"), {"k": lock_key(MIGRATION_LOCK)}
                    )
                    conn.commit()
            return
        database = engine.url.database
        if not database or database == ":memory:":
            yield
            return
        with open(f"{database}.migrate.lock", "a+b") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)


def _applied_before_alembic(engine: Engine) -> str | None:
    """The last hand-written migration a database made before Alembic recorded (its
    ``aligngate_migrations`` table), which is the revision of the same name; None."""
    with engine.connect() as conn:
        if not inspect(conn).has_table(migrations_table.name):
            return None
        done = set(conn.execute(select(migrations_table.c.name)).scalars())
    applied = [name for name, _ in MIGRATIONS if name in done]
    # A revision's id is its migration's number: ``m003`` for ``m003_completion_metadata``.
    return applied[-1].split("_", 1)[0] if applied else None


def migrate(engine: Engine) -> list[str]:
    """Bring the schema up to date: the revisions this database lacks, each in its own
    transaction, under ``migration_lock``. A database from before Alembic is stamped with
    the last migration it recorded first. Returns the revisions applied."""
    config = alembic_config()
    script = ScriptDirectory.from_config(config)
    with migration_lock(engine), engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
        config.attributes["connection"] = conn
        if current is None:
            current = _applied_before_alembic(engine)
            if current is not None:
                command.stamp(config, current)
                conn.commit()
                log.info("Recorded the schema's hand-written migrations as Alembic's %s", current)
        pending = [r.revision for r in reversed(list(script.iterate_revisions("heads", current)))]
        if pending:
            command.upgrade(config, "heads")
            conn.commit()
            for revision in pending:
                log.info("Applied migration %s", revision)
    return pending
