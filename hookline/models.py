"""Database rows: deliveries and their verdicts, conversations, callbacks."""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    and_,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.sql.elements import ColumnElement


def utcnow() -> datetime:
    """Return the current time in UTC, naive, as every column stores it."""
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Verdict(enum.StrEnum):
    RECEIVED = "received"  # stored by the gateway, not classified yet
    JOB = "job"
    IGNORED = "ignored"
    FAILED = "failed"


class ConversationStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    AWAITING_INPUT = "awaiting_input"
    FINISHED = "finished"
    ERROR = "error"
    STOPPED = "stopped"


class CallbackStatus(enum.StrEnum):
    PENDING = "pending"
    POSTED = "posted"
    FAILED = "failed"


class Delivery(Base):
    """One accepted webhook delivery: stored by the gateway, then its verdict."""

    __tablename__ = "deliveries"
    __table_args__ = (
        Index(
            "ix_deliveries_received",
            "created_at",
            postgresql_where=text("verdict = 'received'"),
            sqlite_where=text("verdict = 'received'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    delivery_id: Mapped[str] = mapped_column(String(72), unique=True)
    event: Mapped[str] = mapped_column(String(64))
    action: Mapped[str | None] = mapped_column(String(64))
    installation_id: Mapped[int | None] = mapped_column(BigInteger)
    repository: Mapped[str | None] = mapped_column(String(200))
    verdict: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    # The inbox: the JSON text and the headers that matter, until retention ends.
    body: Mapped[str | None] = mapped_column(Text)
    headers: Mapped[dict | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime, default=utcnow, onupdate=utcnow
    )


class Conversation(Base):
    """An agent run started by one trigger, from instructions to result."""

    __tablename__ = "conversations"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    delivery_id: Mapped[str] = mapped_column(String(72), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    repository: Mapped[str] = mapped_column(String(200))
    number: Mapped[int] = mapped_column(Integer)
    installation_id: Mapped[int] = mapped_column(BigInteger)
    author: Mapped[str] = mapped_column(String(100))
    trigger_comment_id: Mapped[int | None] = mapped_column(BigInteger)
    trigger_node_id: Mapped[str | None] = mapped_column(String(100))
    reaction_path: Mapped[str] = mapped_column(Text)
    reply_path: Mapped[str] = mapped_column(Text)
    branch: Mapped[str | None] = mapped_column(String(255))
    # The repository the branch is in: a fork's, for a pull request from a fork.
    head_repository: Mapped[str | None] = mapped_column(String(200))
    file_path: Mapped[str | None] = mapped_column(Text)
    line: Mapped[int | None] = mapped_column(Integer)
    instructions: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=ConversationStatus.QUEUED)
    result: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    run_attempts: Mapped[int] = mapped_column(Integer, default=0)
    # The turn being worked on, or the last one answered.
    turn: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # The runtime's own id for this conversation, when it keeps one (OpenHands).
    runtime_ref: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime, default=utcnow, onupdate=utcnow
    )
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)

    callbacks: Mapped[list[Callback]] = relationship(back_populates="conversation")
    turns: Mapped[list[Turn]] = relationship(
        back_populates="conversation", order_by="Turn.number"
    )
    transitions: Mapped[list[ConversationTransition]] = relationship(
        order_by="ConversationTransition.id", viewonly=True
    )


class Turn(Base):
    """One exchange in a conversation: what a person asked, and the agent's reply.

    Turn 1 holds the rendered instructions; each follow-up mention adds a turn.
    A turn that arrives while another runs waits, unanswered, for its turn.
    """

    __tablename__ = "conversation_turns"
    __table_args__ = (UniqueConstraint("conversation_id", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("conversations.id"))
    number: Mapped[int] = mapped_column(Integer)
    delivery_id: Mapped[str] = mapped_column(String(72), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # where it was asked, as a trigger
    author: Mapped[str] = mapped_column(String(100))
    request: Mapped[str] = mapped_column(Text)
    reply_path: Mapped[str] = mapped_column(Text)
    reaction_path: Mapped[str] = mapped_column(Text)
    # The "working on it" comment, which the turn's result replaces when it comes.
    status_comment_id: Mapped[int | None] = mapped_column(BigInteger)
    status_comment_path: Mapped[str | None] = mapped_column(Text)
    reply: Mapped[str | None] = mapped_column(Text)
    summary: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    answered_at: Mapped[datetime | None] = mapped_column(DateTime)

    conversation: Mapped[Conversation] = relationship(back_populates="turns")

    @classmethod
    def at(cls, conversation_id: uuid.UUID, number: int) -> ColumnElement[bool]:
        """Return the condition that picks one turn of one conversation."""
        return and_(cls.conversation_id == conversation_id, cls.number == number)


class Callback(Base):
    """One report back to GitHub about a conversation's change of state."""

    __tablename__ = "callbacks"
    __table_args__ = (
        UniqueConstraint(
            "conversation_id",
            "turn",
            "event",
            name="uq_callbacks_conversation_turn_event",
        ),
        UniqueConstraint("delivery_id", name="uq_callbacks_delivery_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("conversations.id"))
    turn: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    event: Mapped[str] = mapped_column(String(32))
    # The delivery that asked for this callback, when one did (`@bot stop`).
    delivery_id: Mapped[str | None] = mapped_column(String(72))
    status: Mapped[str] = mapped_column(String(16), default=CallbackStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    github_comment_id: Mapped[int | None] = mapped_column(BigInteger)
    github_path: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime, default=utcnow, onupdate=utcnow
    )

    conversation: Mapped[Conversation] = relationship(back_populates="callbacks")


class ConversationTransition(Base):
    """One change of a conversation's state: when, from what, to what, and why."""

    __tablename__ = "conversation_transitions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("conversations.id"), index=True
    )
    from_status: Mapped[str | None] = mapped_column(String(16))
    to_status: Mapped[str] = mapped_column(String(16))
    cause: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class StatusEvent(Base):
    """One conversation state change owed to one status webhook URL (the outbox).

    Added in the transaction that records the transition, so an event exists
    exactly when its transition committed; hookline.status_webhooks builds it and
    tasks.status_webhooks sends it.
    """

    class State(enum.StrEnum):
        PENDING = "pending"
        # Claimed by a flush that is POSTing it; the claim lapses at claimed_until.
        SENDING = "sending"
        SENT = "sent"
        FAILED = "failed"

    __tablename__ = "status_events"
    __table_args__ = (
        UniqueConstraint(
            "event_id", "target_url", name="uq_status_events_event_target"
        ),
        # What the flush claims: a target's unsent rows, oldest first. Sent and
        # failed rows, the bulk of the table, stay out of the index.
        Index(
            "ix_status_events_unsent",
            "target_url",
            "id",
            postgresql_where=text("status IN ('pending', 'sending')"),
            sqlite_where=text("status IN ('pending', 'sending')"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Shared by the rows of one transition and kept across retries: receivers
    # dedupe on it.
    event_id: Mapped[uuid.UUID] = mapped_column()
    conversation_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("conversations.id"), index=True
    )
    target_url: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default=State.PENDING)
    # POSTs that carried it, over every flush.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Flushes that did not deliver it; past a bound it is given up.
    failed_flushes: Mapped[int] = mapped_column(
        Integer, default=0, server_default=text("0")
    )
    last_error: Mapped[str | None] = mapped_column(Text)
    # The batch (X-Hookline-Batch) that carries it, fixed at its first claim so
    # that every retry is the same batch.
    batch_id: Mapped[str | None] = mapped_column(String(36))
    # A pending row waits out its backoff: no flush claims it before this.
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime)
    # The flush sending it, and when that claim lapses if the flush never reports.
    claim_token: Mapped[str | None] = mapped_column(String(36))
    claimed_until: Mapped[datetime | None] = mapped_column(DateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime)


class RunStatus(enum.StrEnum):
    PENDING = "PENDING"
    COMPLETED = "COMPLETED"
    FAILURE = "FAILURE"


class WorkflowRun(Base):
    """A GitHub Actions run on a branch a conversation works on.

    The runs of one commit form the conversation's group for that commit: once
    every run in it has completed and one failed, the group is reported once.
    """

    __tablename__ = "workflow_runs"
    __table_args__ = (Index("ix_workflow_runs_group", "conversation_id", "head_sha"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # GitHub's run id
    conversation_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("conversations.id"))
    name: Mapped[str] = mapped_column(String(200))
    head_sha: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(16))
    html_url: Mapped[str | None] = mapped_column(Text)
    reported: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime, default=utcnow, onupdate=utcnow
    )


class GitHubCall(Base):
    """One call a task made to GitHub's API for a delivery, and how it went."""

    __tablename__ = "github_calls"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    delivery_id: Mapped[str] = mapped_column(String(72), index=True)
    task: Mapped[str] = mapped_column(String(64))
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(Text)
    status: Mapped[int] = mapped_column(Integer)  # 0: no answer came back
    milliseconds: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
