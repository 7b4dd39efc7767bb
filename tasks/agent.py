"""The agent pool: run a stored conversation under a lease, then queue its callback.

An agent run can take minutes, longer than a Celery message should stay unacked
(a Redis broker would hand it to a second worker). So the message is acknowledged
when the run starts, and the run holds a lease in the database that it renews
while it works. A run whose lease lapses (its worker died) is queued again by the
sweeper that beat runs every half minute.
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import IntegrityError

from config.settings import Settings
from hookline import lifecycle
from hookline.db import session_scope
from hookline.models import (
    Callback,
    CallbackStatus,
    Conversation,
    ConversationStatus,
    utcnow,
)
from hookline.runtime import (
    AgentOutcome,
    AgentRequest,
    AgentRuntime,
    AgentStatus,
    runtime_for,
)
from tasks import common
from tasks.conversations import queue_run
from workers.celery_app import POST_CALLBACK_TASK, RUN_AGENT_TASK, SWEEP_TASK, app

log = logging.getLogger(__name__)

# A conversation whose run failed to start this many times is given up as an error.
MAX_RUN_ATTEMPTS = 3


def claim_run(database_url: str, conversation_id: uuid.UUID, lease: int) -> bool:
    """Take the lease on a queued run, or on one whose lease lapsed."""
    now = utcnow()
    # Each claim is one conditional UPDATE, so two workers cannot both win; trying
    # the two cases apart tells which transition to record.
    cases = [
        (ConversationStatus.QUEUED, Conversation.status == ConversationStatus.QUEUED),
        (
            ConversationStatus.RUNNING,
            and_(
                Conversation.status == ConversationStatus.RUNNING,
                Conversation.lease_expires_at < now,
            ),
        ),
    ]
    with session_scope(database_url) as session:
        for previous, condition in cases:
            claimed = session.execute(
                update(Conversation)
                .where(Conversation.id == conversation_id, condition)
                .values(
                    status=ConversationStatus.RUNNING,
                    lease_expires_at=now + timedelta(seconds=lease),
                    run_attempts=Conversation.run_attempts + 1,
                )
            ).rowcount
            if claimed:
                cause = (
                    "agent run started"
                    if previous == ConversationStatus.QUEUED
                    else "lease lapsed; run taken over"
                )
                lifecycle.record(
                    session,
                    conversation_id,
                    previous,
                    ConversationStatus.RUNNING,
                    cause,
                )
                return True
    return False


def renew_lease(database_url: str, conversation_id: uuid.UUID, lease: int) -> None:
    """Push a running conversation's lease forward."""
    with session_scope(database_url) as session:
        session.execute(
            update(Conversation)
            .where(
                Conversation.id == conversation_id,
                Conversation.status == ConversationStatus.RUNNING,
            )
            .values(lease_expires_at=utcnow() + timedelta(seconds=lease))
        )


def finish_run(
    database_url: str, conversation_id: uuid.UUID, outcome: AgentOutcome
) -> str:
    """Store how the run ended and the callback it owes, in one transaction."""
    status = ConversationStatus(outcome.status.value)
    with session_scope(database_url) as session:
        conversation = session.get_one(Conversation, conversation_id)
        lifecycle.record(
            session,
            conversation_id,
            conversation.status,
            status,
            outcome.error or "agent finished",
        )
        conversation.status = status.value
        conversation.result = outcome.output or None
        conversation.error = outcome.error or None
        conversation.lease_expires_at = None
        conversation.finished_at = utcnow()
        session.add(Callback(conversation_id=conversation_id, event=status.value))
    return status.value


def queue_callback(conversation_id: uuid.UUID, event: str, delivery_id: str) -> None:
    """Hand a callback to the callback pool."""
    app.send_task(
        POST_CALLBACK_TASK,
        kwargs={
            "conversation_id": str(conversation_id),
            "event": event,
            "delivery_id": delivery_id,
        },
    )


def run_conversation(
    config: Settings,
    conversation_id: uuid.UUID,
    delivery_id: str,
    runtime: AgentRuntime,
) -> str | None:
    """Run one conversation's agent if no one else is, and queue its callback."""
    url, lease = config.DATABASE_URL, config.HOOKLINE_LEASE_SECONDS
    if not claim_run(url, conversation_id, lease):
        log.info("agent.not_claimed", extra={"conversation": str(conversation_id)})
        return None

    with session_scope(url) as session:
        conversation = session.get_one(Conversation, conversation_id)
    if conversation.run_attempts > MAX_RUN_ATTEMPTS:
        outcome = AgentOutcome(
            AgentStatus.ERROR,
            error=f"the agent run was interrupted {MAX_RUN_ATTEMPTS} times",
        )
    else:
        log.info("agent.started", extra={"conversation": str(conversation_id)})
        outcome = runtime.run(
            AgentRequest(
                instructions=conversation.instructions,
                context=_agent_context(conversation),
                timeout=config.HOOKLINE_AGENT_TIMEOUT,
            ),
            heartbeat=lambda: renew_lease(url, conversation_id, lease),
            heartbeat_every=lease / 3,
        )

    try:
        event = finish_run(url, conversation_id, outcome)
    except (IntegrityError, lifecycle.IllegalTransition):
        # Another run of it finished first, or it was stopped meanwhile.
        log.warning(
            "agent.already_finished", extra={"conversation": str(conversation_id)}
        )
        return None
    queue_callback(conversation_id, event, delivery_id)
    log.info(
        "agent.finished",
        extra={
            "conversation": str(conversation_id),
            "status": event,
            "error": outcome.error,
        },
    )
    return event


def _agent_context(conversation: Conversation) -> dict[str, str]:
    context = {
        "HOOKLINE_CONVERSATION_ID": str(conversation.id),
        "HOOKLINE_REPOSITORY": conversation.repository,
        "HOOKLINE_NUMBER": str(conversation.number),
        "HOOKLINE_TRIGGER_KIND": conversation.kind,
        "HOOKLINE_AUTHOR": conversation.author,
        "HOOKLINE_BRANCH": conversation.branch or "",
        "HOOKLINE_FILE_PATH": conversation.file_path or "",
        "HOOKLINE_LINE": str(conversation.line or ""),
    }
    return context


# Acknowledged at once: the run's own lease, not the broker, guards it (see above).
@app.task(
    name=RUN_AGENT_TASK,
    acks_late=False,
    soft_time_limit=None,
    time_limit=common.settings().HOOKLINE_AGENT_TIMEOUT + 60,
    **common.OUTAGE_RETRY,
)
def run_agent(conversation_id: str, delivery_id: str) -> str | None:
    """Run the agent for a stored conversation."""
    config = common.settings()
    runtime = runtime_for(config.HOOKLINE_AGENT_COMMAND)
    return run_conversation(config, uuid.UUID(conversation_id), delivery_id, runtime)


def find_stalled(config: Settings) -> tuple[list[tuple], list[tuple]]:
    """Return runs nobody holds and callbacks never picked up, with delivery ids."""
    now = utcnow()
    unclaimed_before = now - timedelta(seconds=2 * config.HOOKLINE_LEASE_SECONDS)
    runs = select(Conversation.id, Conversation.delivery_id).where(
        or_(
            and_(
                Conversation.status == ConversationStatus.QUEUED,
                Conversation.updated_at < unclaimed_before,
            ),
            and_(
                Conversation.status == ConversationStatus.RUNNING,
                Conversation.lease_expires_at < now,
            ),
        )
    )
    # A callback's message is acked late, so the broker brings it back if its
    # worker dies; only one never queued (the agent worker died between commit and
    # send) is left with no attempt at all.
    callbacks = (
        select(Callback.conversation_id, Callback.event, Conversation.delivery_id)
        .join(Conversation)
        .where(
            Callback.status == CallbackStatus.PENDING,
            Callback.attempts == 0,
            Callback.created_at
            < now - timedelta(seconds=config.CELERY_VISIBILITY_TIMEOUT),
        )
    )
    with session_scope(config.DATABASE_URL) as session:
        return list(session.execute(runs)), list(session.execute(callbacks))


@app.task(name=SWEEP_TASK, **common.OUTAGE_RETRY)
def requeue_stalled_work() -> int:
    """Queue again the runs whose lease lapsed and the callbacks never queued."""
    runs, callbacks = find_stalled(common.settings())
    for conversation_id, delivery_id in runs:
        queue_run(conversation_id, delivery_id)
    for conversation_id, event, delivery_id in callbacks:
        queue_callback(conversation_id, event, delivery_id)
    if runs or callbacks:
        log.warning(
            "sweep.requeued", extra={"runs": len(runs), "callbacks": len(callbacks)}
        )
    return len(runs) + len(callbacks)
