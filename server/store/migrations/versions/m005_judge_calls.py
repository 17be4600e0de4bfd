"""m005_judge_calls: AI judges' calls.

One of the store's first revisions: the hand-written migration of the same name
(``server.store.schema.MIGRATIONS``), which databases made before Alembic recorded in
``aligngate_migrations`` (``database.migrate`` stamps them).
"""

from __future__ import annotations

from alembic import op

from server.store.schema import MIGRATIONS

revision = "m005"
down_revision = "m004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    dict(MIGRATIONS)["m005_judge_calls"](op.get_bind())


def downgrade() -> None:
    raise NotImplementedError("the store's revisions only go forward")
