"""delivery inbox: the gateway stores each accepted delivery's body and headers

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 20:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# What the requeue sweep reads: the few rows still waiting for a verdict.
RECEIVED_INDEX = "ix_deliveries_received"


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("body", sa.Text(), nullable=True))
        batch.add_column(sa.Column("headers", sa.JSON(), nullable=True))
    op.create_index(
        RECEIVED_INDEX,
        "deliveries",
        ["created_at"],
        postgresql_where=sa.text("verdict = 'received'"),
        sqlite_where=sa.text("verdict = 'received'"),
    )


def downgrade() -> None:
    op.drop_index(RECEIVED_INDEX, "deliveries")
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("headers")
        batch.drop_column("body")
