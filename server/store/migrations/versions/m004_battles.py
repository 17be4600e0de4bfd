"""m004_battles: The arena's battles.

One of the store's first revisions: the hand-written migration of the same name
(``server.store.schema.MIGRATIONS``), which databases made before Alembic recorded in
``aligngate_migrations`` (``database.migrate`` stamps them).
"""

from __future__ import annotations

from alembic import op

from server.store.schema import MIGRATIONS

revision = "m004"
down_revision = "m003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    dict(MIGRATIONS)["m004_battles"](op.get_bind())


def downgrade() -> None:
    raise NotImplementedError("the store's revisions only go forward")
