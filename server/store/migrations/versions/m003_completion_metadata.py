"""m003_completion_metadata: Stored completions' metadata (OpenAI's Stored Completions).

One of the store's first revisions: the hand-written migration of the same name
(``server.store.schema.MIGRATIONS``), which databases made before Alembic recorded in
``aligngate_migrations`` (``database.migrate`` stamps them).
"""

from __future__ import annotations

from alembic import op

from server.store.schema import MIGRATIONS

revision = "m003"
down_revision = "m002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    dict(MIGRATIONS)["m003_completion_metadata"](op.get_bind())


def downgrade() -> None:
    raise NotImplementedError("the store's revisions only go forward")
