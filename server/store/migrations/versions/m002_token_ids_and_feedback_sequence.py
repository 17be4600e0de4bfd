"""m002_token_ids_and_feedback_sequence: token ids on completions, and feedback's
commit-order sequence.

One of the store's first revisions: the hand-written migration of the same name
(``server.store.schema.MIGRATIONS``), which databases made before Alembic recorded in
``aligngate_migrations`` (``database.migrate`` stamps them).
"""

from __future__ import annotations

from alembic import op

from server.store.schema import MIGRATIONS

revision = "m002"
down_revision = "m001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    dict(MIGRATIONS)["m002_token_ids_and_feedback_sequence"](op.get_bind())


def downgrade() -> None:
    raise NotImplementedError("the store's revisions only go forward")
