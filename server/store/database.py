"""Opening the database: SQLite (default, a file under the data directory) or PostgreSQL by
URL, with the durability settings that make an acknowledged write a write on disk.

Owns: engine creation, connection pragmas, applying migrations.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.engine import make_url

from server.store.schema import MIGRATIONS, migrations_table

log = logging.getLogger(__name__)


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


def migrate(engine: Engine) -> list[str]:
    """Apply the migrations this database lacks, each in its own transaction."""
    with engine.begin() as conn:
        migrations_table.create(conn, checkfirst=True)
    applied: list[str] = []
    for name, apply in MIGRATIONS:
        with engine.begin() as conn:
            done = conn.execute(
                select(migrations_table.c.name).where(migrations_table.c.name == name)
            ).first()
            if done:
                continue
            apply(conn)
            conn.execute(migrations_table.insert().values(name=name, applied_at=time.time()))
            applied.append(name)
            log.info("Applied migration %s", name)
    return applied
