"""status event retries: backoff, claims, and an index over every unsent row

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-09 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_INDEX = "ix_status_events_pending"
NEW_INDEX = "ix_status_events_unsent"
COLUMNS = ("failed_flushes", "next_attempt_at", "claim_token", "claimed_until")


def upgrade() -> None:
    with op.batch_alter_table("status_events") as batch:
        batch.add_column(
            sa.Column(
                "failed_flushes",
                sa.Integer(),
                nullable=False,
                server_default=sa.text("0"),
            )
        )
        batch.add_column(sa.Column("next_attempt_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("claim_token", sa.String(36), nullable=True))
        batch.add_column(sa.Column("claimed_until", sa.DateTime(), nullable=True))

    # Claims now read rows being sent too: one whose claim lapsed is sent again.
    op.drop_index(OLD_INDEX, table_name="status_events")
    unsent = sa.text("status IN ('pending', 'sending')")
    op.create_index(
        NEW_INDEX,
        "status_events",
        ["target_url", "id"],
        postgresql_where=unsent,
        sqlite_where=unsent,
    )


def downgrade() -> None:
    # The previous flush knows no `sending`: hand those rows back as pending.
    op.execute(
        sa.text("UPDATE status_events SET status = 'pending' WHERE status = 'sending'")
    )
    op.drop_index(NEW_INDEX, table_name="status_events")
    pending = sa.text("status = 'pending'")
    op.create_index(
        OLD_INDEX,
        "status_events",
        ["target_url", "id"],
        postgresql_where=pending,
        sqlite_where=pending,
    )
    with op.batch_alter_table("status_events") as batch:
        for column in reversed(COLUMNS):
            batch.drop_column(column)
