"""The states a conversation moves through, and the only ways it may move.

Every change is recorded with its time and cause; a change the table below does
not allow is refused and logged, never applied.
"""

from __future__ import annotations

import logging
import uuid

from sqlalchemy.orm import Session

from hookline import status_webhooks
from hookline.models import ConversationStatus, ConversationTransition

log = logging.getLogger(__name__)

S = ConversationStatus
ALLOWED: dict[ConversationStatus | None, set[ConversationStatus]] = {
    None: {S.QUEUED},
    S.QUEUED: {S.RUNNING, S.ERROR, S.STOPPED},
    # running → running: a run whose lease lapsed is taken over by another worker.
    # running → queued: a turn ended while a follow-up waited; it goes next.
    S.RUNNING: {
        S.RUNNING,
        S.QUEUED,
        S.AWAITING_INPUT,
        S.FINISHED,
        S.ERROR,
        S.STOPPED,
    },
    # awaiting_input → queued: the user answered; the answer waits for a worker.
    S.AWAITING_INPUT: {S.QUEUED, S.ERROR, S.STOPPED},
    S.FINISHED: set(),
    S.ERROR: set(),
    S.STOPPED: set(),
}


class IllegalTransition(ValueError):
    """A state change the lifecycle does not allow."""


def check(
    current: ConversationStatus | str | None, target: ConversationStatus | str
) -> None:
    """Raise IllegalTransition unless `current` may become `target`."""
    source = S(current) if current is not None else None
    if S(target) not in ALLOWED[source]:
        raise IllegalTransition(f"a conversation cannot go from {source} to {target}")


def record(
    session: Session,
    conversation_id: uuid.UUID,
    current: ConversationStatus | str | None,
    target: ConversationStatus | str,
    cause: str,
) -> None:
    """Add the transition row for a change the caller is making in this session."""
    try:
        check(current, target)
    except IllegalTransition:
        log.error(
            "conversation.illegal_transition",
            extra={
                "conversation": str(conversation_id),
                "from_status": current,
                "to_status": str(target),
                "cause": cause,
            },
        )
        raise
    session.add(
        ConversationTransition(
            conversation_id=conversation_id,
            from_status=None if current is None else str(current),
            to_status=str(target),
            cause=cause,
        )
    )
    status_webhooks.add_events(session, conversation_id, current, target, cause)
    log.info(
        "conversation.transition",
        extra={
            "conversation": str(conversation_id),
            "from_status": current,
            "to_status": str(target),
            "cause": cause,
        },
    )
