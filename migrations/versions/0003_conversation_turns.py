"""conversation turns: follow-ups, the working comment, per-turn callbacks

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 19:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NEW_UNIQUE = "uq_callbacks_conversation_turn_event"
DELIVERY_UNIQUE = "uq_callbacks_delivery_id"
# PostgreSQL's name for the unnamed constraint 0001 created.
OLD_UNIQUE = "callbacks_conversation_id_event_key"


def _callbacks_before() -> sa.Table:
    """The callbacks table as 0001 made it, minus the unique constraint to drop.

    SQLite cannot drop an unnamed constraint; the batch copy starts from this
    shape instead of reflecting it.
    """
    return sa.Table(
        "callbacks",
        sa.MetaData(),
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "conversation_id",
            sa.Uuid(),
            sa.ForeignKey("conversations.id"),
            nullable=False,
        ),
        sa.Column("event", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("github_comment_id", sa.BigInteger(), nullable=True),
        sa.Column("github_path", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    )


def upgrade() -> None:
    op.create_table(
        "conversation_turns",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("conversation_id", sa.Uuid(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("delivery_id", sa.String(length=72), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("author", sa.String(length=100), nullable=False),
        sa.Column("request", sa.Text(), nullable=False),
        sa.Column("reply_path", sa.Text(), nullable=False),
        sa.Column("reaction_path", sa.Text(), nullable=False),
        sa.Column("status_comment_id", sa.BigInteger(), nullable=True),
        sa.Column("status_comment_path", sa.Text(), nullable=True),
        sa.Column("reply", sa.Text(), nullable=True),
        sa.Column("summary", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("answered_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["conversation_id"], ["conversations.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("conversation_id", "number"),
        sa.UniqueConstraint("delivery_id"),
    )
    with op.batch_alter_table("conversations") as batch:
        batch.add_column(
            sa.Column("turn", sa.Integer(), server_default="1", nullable=False)
        )
        batch.add_column(sa.Column("runtime_ref", sa.String(length=200)))

    turn = sa.Column("turn", sa.Integer(), server_default="1", nullable=False)
    delivery = sa.Column("delivery_id", sa.String(length=72), nullable=True)
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table(
            "callbacks", recreate="always", copy_from=_callbacks_before()
        ) as batch:
            batch.add_column(turn)
            batch.add_column(delivery)
            batch.create_unique_constraint(
                NEW_UNIQUE, ["conversation_id", "turn", "event"]
            )
            batch.create_unique_constraint(DELIVERY_UNIQUE, ["delivery_id"])
    else:
        op.drop_constraint(OLD_UNIQUE, "callbacks", type_="unique")
        op.add_column("callbacks", turn)
        op.add_column("callbacks", delivery)
        op.create_unique_constraint(
            NEW_UNIQUE, "callbacks", ["conversation_id", "turn", "event"]
        )
        op.create_unique_constraint(DELIVERY_UNIQUE, "callbacks", ["delivery_id"])

    # Conversations stored before turns existed get their first turn back.
    op.execute(
        """
        INSERT INTO conversation_turns (conversation_id, number, delivery_id, kind,
            author, request, reply_path, reaction_path, reply, created_at,
            answered_at)
        SELECT id, 1, delivery_id, kind, author, instructions, reply_path,
            reaction_path, COALESCE(result, error), created_at, finished_at
        FROM conversations
        """
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("callbacks", recreate="always") as batch:
            batch.drop_constraint(DELIVERY_UNIQUE, type_="unique")
            batch.drop_constraint(NEW_UNIQUE, type_="unique")
            batch.drop_column("delivery_id")
            batch.drop_column("turn")
            batch.create_unique_constraint(OLD_UNIQUE, ["conversation_id", "event"])
    else:
        op.drop_constraint(DELIVERY_UNIQUE, "callbacks", type_="unique")
        op.drop_constraint(NEW_UNIQUE, "callbacks", type_="unique")
        op.drop_column("callbacks", "delivery_id")
        op.drop_column("callbacks", "turn")
        op.create_unique_constraint(
            OLD_UNIQUE, "callbacks", ["conversation_id", "event"]
        )
    with op.batch_alter_table("conversations") as batch:
        batch.drop_column("runtime_ref")
        batch.drop_column("turn")
    op.drop_table("conversation_turns")
