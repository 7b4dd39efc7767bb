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
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session
from tenacity import (
    retry,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from config.settings import Settings
from hookline import lifecycle
from hookline.db import session_scope
from hookline.models import (
    Callback,
    CallbackStatus,
    Conversation,
    ConversationStatus,
    Turn,
    utcnow,
)
from hookline.runtime import (
    AgentOutcome,
    AgentRequest,
    AgentRuntime,
    AgentStatus,
    Message,
    Purpose,
    runtime_for,
)
from tasks import common
from tasks.conversations import queue_callback, queue_run
from tasks.rendering import render
from workers.celery_app import RUN_AGENT_TASK, SWEEP_TASK, app

log = logging.getLogger(__name__)

# The runtime stops an agent at HOOKLINE_AGENT_TIMEOUT; two turns (the work and
# the summary before a question) and the database's waits fit in this.
AGENT_SOFT_LIMIT = 2 * common.settings().HOOKLINE_AGENT_TIMEOUT + 150

# A conversation whose run failed to start this many times is given up as an error.
MAX_RUN_ATTEMPTS = 3


class Superseded(Exception):
    """The turn is no longer this run's: stopped, or taken over and finished."""


def claim_run(database_url: str, conversation_id: uuid.UUID, lease: int) -> int | None:
    """Take the lease on a queued run, or on one whose lease lapsed.

    Returns the turn to work on: the earliest one without a reply.
    """
    with session_scope(database_url) as session:
        return _claim(session, conversation_id, lease)


def claim_and_read(
    database_url: str, conversation_id: uuid.UUID, lease: int
) -> tuple[int, Conversation, tuple[Message, ...]] | None:
    """Claim a run as claim_run does; return its turn, conversation and transcript.

    Read in the claim's own transaction: one round of checkout and commit fewer
    per run, and what is read is what the claim saw.
    """
    with session_scope(database_url) as session:
        turn_number = _claim(session, conversation_id, lease)
        if turn_number is None:
            return None
        conversation = session.get_one(Conversation, conversation_id)
        return turn_number, conversation, transcript(conversation, turn_number)


def _claim(session: Session, conversation_id: uuid.UUID, lease: int) -> int | None:
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
    # The turn to work on, picked by the same statement that claims the run.
    earliest_unanswered = func.coalesce(
        select(func.min(Turn.number))
        .where(Turn.conversation_id == conversation_id, Turn.reply.is_(None))
        .scalar_subquery(),
        1,
    )
    for previous, condition in cases:
        turn = session.execute(
            update(Conversation)
            .where(Conversation.id == conversation_id, condition)
            .values(
                status=ConversationStatus.RUNNING,
                lease_expires_at=now + timedelta(seconds=lease),
                run_attempts=Conversation.run_attempts + 1,
                turn=earliest_unanswered,
            )
            .returning(Conversation.turn)
            .execution_options(synchronize_session=False)
        ).scalar_one_or_none()
        if turn is None:
            continue
        cause = (
            f"agent run of turn {turn} started"
            if previous == ConversationStatus.QUEUED
            else f"lease lapsed; run of turn {turn} taken over"
        )
        lifecycle.record(
            session, conversation_id, previous, ConversationStatus.RUNNING, cause
        )
        return turn
    return None


def renew_lease(database_url: str, conversation_id: uuid.UUID, lease: int) -> bool:
    """Push a running conversation's lease forward; False if it no longer runs.

    A database that does not answer is not a stop: the agent goes on, and if
    the lease lapses meanwhile, the sweep's takeover is the worst that happens.
    """
    try:
        with session_scope(database_url) as session:
            renewed = session.execute(
                update(Conversation)
                .where(
                    Conversation.id == conversation_id,
                    Conversation.status == ConversationStatus.RUNNING,
                )
                .values(lease_expires_at=utcnow() + timedelta(seconds=lease))
            ).rowcount
    except DATABASE_OUTAGES as exc:
        log.warning("agent.lease_not_renewed", extra={"error": type(exc).__name__})
        return True
    return renewed > 0


# The run's outcome is only in this process: a database outage when it is to be
# stored is waited out here, rather than losing the run to a task retry that
# would find the conversation still leased and do nothing.
DATABASE_OUTAGES = (OperationalError, InterfaceError)
_outlast_outage = retry(
    retry=retry_if_exception_type(DATABASE_OUTAGES),
    wait=wait_exponential(multiplier=0.5, max=5),
    stop=stop_after_delay(120),
    before_sleep=lambda state: log.warning(
        "agent.database_unavailable", extra={"attempt": state.attempt_number}
    ),
    reraise=True,
)


@_outlast_outage
def remember_ref(database_url: str, conversation_id: uuid.UUID, ref: str) -> None:
    """Store the runtime's own id for a conversation as soon as it names one."""
    with session_scope(database_url) as session:
        session.execute(
            update(Conversation)
            .where(Conversation.id == conversation_id)
            .values(runtime_ref=ref)
        )


@_outlast_outage
def finish_turn(
    database_url: str,
    conversation_id: uuid.UUID,
    turn_number: int,
    outcome: AgentOutcome,
    summary: str | None = None,
) -> tuple[str, ConversationStatus]:
    """Store a turn's reply, move the conversation on, and owe the turn's callback.

    A turn that ends while a later one waits sends the conversation back to
    the queue for it, whether the agent finished or asked; an error ends the
    conversation. Returns the callback's event and the conversation's status.
    """
    event = outcome.status.value
    with session_scope(database_url) as session:
        conversation = session.get_one(
            Conversation, conversation_id, with_for_update=True
        )
        if (
            conversation.status != ConversationStatus.RUNNING
            or conversation.turn != turn_number
        ):
            raise Superseded(
                f"turn {turn_number} is over: the conversation is "
                f"{conversation.status} at turn {conversation.turn}"
            )
        turn = session.scalars(
            select(Turn).where(Turn.at(conversation_id, turn_number))
        ).one()
        turn.reply = outcome.output or f"(error) {outcome.error}"
        turn.summary = summary
        turn.answered_at = utcnow()
        waiting = session.scalar(
            select(func.count(Turn.id)).where(
                Turn.conversation_id == conversation_id, Turn.number > turn_number
            )
        )
        target = ConversationStatus(event)
        cause = outcome.error or (
            "agent finished"
            if target == ConversationStatus.FINISHED
            else "agent asked a question"
        )
        if waiting and target != ConversationStatus.ERROR:
            target = ConversationStatus.QUEUED
            cause = f"turn {turn_number} {event}; turn {turn_number + 1} is waiting"
        lifecycle.record(session, conversation_id, conversation.status, target, cause)
        conversation.status = target.value
        conversation.lease_expires_at = None
        if outcome.runtime_ref:
            conversation.runtime_ref = outcome.runtime_ref
        if outcome.status == AgentStatus.FINISHED:
            conversation.result = outcome.output
        if outcome.status == AgentStatus.ERROR:
            conversation.error = outcome.error
        if target == ConversationStatus.QUEUED:
            conversation.run_attempts = 0
        if target in (ConversationStatus.FINISHED, ConversationStatus.ERROR):
            conversation.finished_at = utcnow()
        session.add(
            Callback(conversation_id=conversation_id, turn=turn_number, event=event)
        )
    return event, target


def transcript(conversation: Conversation, turn_number: int) -> tuple[Message, ...]:
    """Return the conversation's messages up to the question of `turn_number`."""
    messages: list[Message] = []
    for turn in conversation.turns:
        if turn.number > turn_number:
            break
        messages.append(Message("user", turn.request, turn.author))
        if turn.number < turn_number and turn.reply is not None:
            messages.append(Message("agent", turn.reply))
    return tuple(messages)


def summarize(
    runtime: AgentRuntime,
    request: AgentRequest,
    question: AgentOutcome,
    override_dir: str,
    heartbeat: Callable[[], bool],
    heartbeat_every: float,
) -> str | None:
    """Ask the runtime to sum up its progress before the question is posted."""
    prompt = render("summary_prompt.j2", override_dir)
    summary = runtime.run(
        replace(
            request,
            messages=(
                *request.messages,
                Message("agent", question.output),
                Message("hookline", prompt),
            ),
            runtime_ref=question.runtime_ref or request.runtime_ref,
            purpose=Purpose.SUMMARY,
        ),
        heartbeat=heartbeat,
        heartbeat_every=heartbeat_every,
    )
    if summary.status == AgentStatus.ERROR:
        log.warning("agent.no_summary", extra={"error": summary.error})
        return None
    return summary.output


def run_conversation(
    config: Settings,
    conversation_id: uuid.UUID,
    delivery_id: str,
    runtime: AgentRuntime,
) -> str | None:
    """Run the agent on a conversation's next turn if no one else is on it."""
    url, lease = config.DATABASE_URL, config.HOOKLINE_LEASE_SECONDS
    claimed = claim_and_read(url, conversation_id, lease)
    if claimed is None:
        log.info("agent.not_claimed", extra={"conversation": str(conversation_id)})
        return None

    turn_number, conversation, messages = claimed
    summary = None
    if conversation.run_attempts > MAX_RUN_ATTEMPTS:
        outcome = AgentOutcome(
            AgentStatus.ERROR,
            error=f"the agent run was interrupted {MAX_RUN_ATTEMPTS} times",
        )
    else:
        log.info(
            "agent.started",
            extra={"conversation": str(conversation_id), "turn": turn_number},
        )
        request = AgentRequest(
            conversation_id=str(conversation_id),
            messages=messages,
            context=_agent_context(conversation),
            timeout=config.HOOKLINE_AGENT_TIMEOUT,
            runtime_ref=conversation.runtime_ref,
            on_ref=lambda ref: remember_ref(url, conversation_id, ref),
        )

        def heartbeat() -> bool:
            return renew_lease(url, conversation_id, lease)

        outcome = runtime.run(request, heartbeat, lease / 3)
        if outcome.status == AgentStatus.AWAITING_INPUT:
            summary = summarize(
                runtime,
                request,
                outcome,
                config.HOOKLINE_TEMPLATES_DIR,
                heartbeat,
                lease / 3,
            )

    try:
        event, status = finish_turn(url, conversation_id, turn_number, outcome, summary)
    except (IntegrityError, lifecycle.IllegalTransition, Superseded) as exc:
        # Stopped meanwhile, or another run of this turn finished first.
        log.warning(
            "agent.superseded",
            extra={"conversation": str(conversation_id), "reason": str(exc)},
        )
        return None
    queue_callback(conversation_id, turn_number, event, delivery_id)
    if status == ConversationStatus.QUEUED:
        queue_run(conversation_id, delivery_id)
    log.info(
        "agent.finished",
        extra={
            "conversation": str(conversation_id),
            "turn": turn_number,
            "outcome": event,
            "status": str(status),
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
# Both limits are set: a task's None falls back to the short tasks' 90 s soft
# limit, which would cut every longer run short, and a retry with a soft limit
# above the hard one is refused by Celery (the run was then dropped).
@app.task(
    name=RUN_AGENT_TASK,
    acks_late=False,
    soft_time_limit=AGENT_SOFT_LIMIT,
    time_limit=AGENT_SOFT_LIMIT + 30,
    **common.OUTAGE_RETRY,
)
def run_agent(
    conversation_id: str,
    delivery_id: str,
    github_event: str = "",
    installation: int | None = None,
) -> str | None:
    """Run the agent on a stored conversation's next turn.

    `github_event` and `installation` are only for the log lines.
    """
    config = common.settings()
    runtime = runtime_for(config)
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
        select(
            Callback.conversation_id,
            Callback.turn,
            Callback.event,
            Conversation.delivery_id,
        )
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
    for conversation_id, turn, event, delivery_id in callbacks:
        queue_callback(conversation_id, turn, event, delivery_id)
    if runs or callbacks:
        log.warning(
            "sweep.requeued", extra={"runs": len(runs), "callbacks": len(callbacks)}
        )
    return len(runs) + len(callbacks)
