"""status events: the outbox of outgoing status webhooks

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04 20:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PENDING_INDEX = "ix_status_events_pending"
CONVERSATION_INDEX = "ix_status_events_conversation_id"


def upgrade() -> None:
    op.create_table(
        "status_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("conversation_id", sa.Uuid(), nullable=False),
        sa.Column("target_url", sa.Text(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("batch_id", sa.String(length=36), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("sent_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["conversation_id"], ["conversations.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(
            "event_id", "target_url", name="uq_status_events_event_target"
        ),
    )
    op.create_index(CONVERSATION_INDEX, "status_events", ["conversation_id"])
    # Partial on both databases: the flush reads pending rows only.
    pending = sa.text("status = 'pending'")
    op.create_index(
        PENDING_INDEX,
        "status_events",
        ["target_url", "id"],
        postgresql_where=pending,
        sqlite_where=pending,
    )


def downgrade() -> None:
    op.drop_index(PENDING_INDEX, table_name="status_events")
    op.drop_index(CONVERSATION_INDEX, table_name="status_events")
    op.drop_table("status_events")
