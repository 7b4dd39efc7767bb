"""The classification pool: does this delivery ask for a job, and may its author?"""

from __future__ import annotations

import logging
from collections.abc import Callable

from celery import Task
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from config.settings import Settings
from hookline.db import session_scope
from hookline.github import GitHubError, PermanentGitHubError, TransientGitHubError
from hookline.models import Delivery, Verdict
from tasks import common
from tasks.triggers import Decision, Trigger, classify
from workers.celery_app import CLASSIFY_TASK, START_CONVERSATION_TASK, app

log = logging.getLogger(__name__)

# GitHub reports the maintain role as "write" here (its role_name says maintain).
WRITE_PERMISSIONS = {"admin", "maintain", "write"}


def decide(
    event: str,
    payload: dict,
    config: Settings,
    permission_of: Callable[[Trigger], str],
) -> Decision:
    """Classify a delivery, then keep a trigger only if its author can write."""
    decision = classify(event, payload, config.OH_LABEL, config.bot_handle)
    if decision.trigger is None:
        return decision
    permission = permission_of(decision.trigger)
    if permission not in WRITE_PERMISSIONS:
        author = decision.trigger["author"]
        return Decision(f"{author} has {permission} permission, not write")
    return decision


def record_verdict(
    database_url: str,
    delivery_id: str,
    event: str,
    payload: dict,
    verdict: Verdict,
    reason: str,
) -> None:
    """Store the verdict on a delivery, replacing the one an earlier attempt stored."""
    values = {
        "event": event,
        "action": payload.get("action"),
        "installation_id": (payload.get("installation") or {}).get("id"),
        "repository": (payload.get("repository") or {}).get("full_name"),
        "verdict": verdict.value,
        "reason": reason,
    }
    query = select(Delivery).where(Delivery.delivery_id == delivery_id)
    try:
        with session_scope(database_url) as session:
            row = session.scalars(query).one_or_none()
            if row is None:
                session.add(Delivery(delivery_id=delivery_id, **values))
            else:
                for name, value in values.items():
                    setattr(row, name, value)
    except IntegrityError:
        # Another attempt at the same delivery inserted it first; update that row.
        with session_scope(database_url) as session:
            row = session.scalars(query).one()
            for name, value in values.items():
                setattr(row, name, value)


def _permission_of(trigger: Trigger) -> str:
    client = common.installation_client(trigger["installation_id"])
    return client.permission(trigger["repository"], trigger["author"])


@app.task(name=CLASSIFY_TASK, bind=True, **common.OUTAGE_RETRY)
def classify_delivery(self: Task, delivery_id: str, event: str, payload: dict) -> str:
    """Decide what a delivery asks for and hand a job to the conversation pool."""
    config = common.settings()
    try:
        decision = decide(event, payload, config, _permission_of)
    except TransientGitHubError as exc:
        common.retry_later(self, exc)
        return _fail(config, delivery_id, event, payload, exc)
    except PermanentGitHubError as exc:
        return _fail(config, delivery_id, event, payload, exc)

    if decision.trigger is None:
        record_verdict(
            config.DATABASE_URL,
            delivery_id,
            event,
            payload,
            Verdict.IGNORED,
            decision.reason,
        )
        log.info("delivery.ignored", extra={"event": event, "reason": decision.reason})
        return Verdict.IGNORED.value

    record_verdict(
        config.DATABASE_URL, delivery_id, event, payload, Verdict.JOB, decision.reason
    )
    # Queued only after the verdict is committed; the conversation pool keys on
    # the delivery id, so a second copy of this message starts nothing new.
    app.send_task(
        START_CONVERSATION_TASK,
        kwargs={"delivery_id": delivery_id, "trigger": decision.trigger},
    )
    log.info("delivery.job", extra={"event": event, "reason": decision.reason})
    return Verdict.JOB.value


def _fail(
    config: Settings, delivery_id: str, event: str, payload: dict, exc: GitHubError
) -> str:
    reason = f"permission check failed: {exc}"
    record_verdict(
        config.DATABASE_URL, delivery_id, event, payload, Verdict.FAILED, reason
    )
    log.error(
        "delivery.failed",
        extra={"event": event, "status": exc.status, "error": str(exc)},
    )
    return Verdict.FAILED.value
