"""Alembic's environment for the store: it runs on the connection ``database.migrate``
hands it (``config.attributes["connection"]``), under the migration lock, and never opens a
database of its own.

Owns: how revisions run (each in its own transaction). Does not know: which database, the
lock (``database.migrate``).
"""

from __future__ import annotations

from alembic import context

from server.store.schema import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    transaction_per_migration=True,
    # SQLite's DDL is transactional too as the store opens it (``database.open_engine``
    # begins each transaction itself): a revision applies whole or not at all.
    transactional_ddl=True,
    # SQLite alters tables by copying them (Alembic's batch mode).
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
