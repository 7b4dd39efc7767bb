"""github calls: each call a task made for a delivery, for `hookline explain`

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 20:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "github_calls",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("delivery_id", sa.String(length=72), nullable=False),
        sa.Column("task", sa.String(length=64), nullable=False),
        sa.Column("method", sa.String(length=8), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("milliseconds", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_github_calls_delivery_id", "github_calls", ["delivery_id"])


def downgrade() -> None:
    op.drop_index("ix_github_calls_delivery_id", "github_calls")
    op.drop_table("github_calls")
