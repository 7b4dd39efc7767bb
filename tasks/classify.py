"""The classification pool: does this delivery ask for a job, and may its author?"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from celery import Task
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from config.logging import bind, forwarded
from config.settings import Settings
from hookline import inbox
from hookline.db import session_scope
from hookline.github import PermanentGitHubError, TransientGitHubError
from hookline.models import Delivery, Verdict
from tasks import common, workflow_runs
from tasks.conversations import queue_callback, queue_run
from tasks.triggers import Decision, MalformedPayload, Trigger, classify
from tasks.workflow_runs import parse_run
from workers.celery_app import (
    CLASSIFY_TASK,
    START_CONVERSATION_TASK,
    SWEEP_INBOX_TASK,
    app,
)

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
    installation = payload.get("installation")
    repository = payload.get("repository")
    installation_id = installation.get("id") if isinstance(installation, dict) else None
    full_name = repository.get("full_name") if isinstance(repository, dict) else None
    action = payload.get("action")
    values = {
        "event": event,
        "action": action[:64] if isinstance(action, str) else None,
        "installation_id": (
            installation_id
            if type(installation_id) is int and 0 < installation_id < 2**63
            else None
        ),
        "repository": full_name[:200] if isinstance(full_name, str) else None,
        "verdict": verdict.value,
        "reason": reason,
    }
    # The gateway stored the row: one UPDATE, no read first. An INSERT only for a
    # delivery that came some other way (a redelivery of an old one, a test).
    update_row = (
        update(Delivery)
        .where(Delivery.delivery_id == delivery_id)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    try:
        with session_scope(database_url) as session:
            if not session.execute(update_row).rowcount:
                session.add(Delivery(delivery_id=delivery_id, **values))
    except IntegrityError:
        # Another attempt at the same delivery inserted it first; update that row.
        with session_scope(database_url) as session:
            session.execute(update_row)


def _permission_of(trigger: Trigger) -> str:
    client = common.installation_client(trigger["installation_id"])
    return client.permission(trigger["repository"], trigger["author"])


def _parse(body: str) -> dict | None:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return payload if isinstance(payload, dict) else None


@app.task(name=CLASSIFY_TASK, bind=True, base=common.GuardedTask, **common.OUTAGE_RETRY)
def classify_delivery(
    self: Task, delivery_id: str, event: str, body: str | None = None
) -> str:
    """Decide what a delivery asks for and hand a job to the conversation pool.

    A large delivery's message carries no body: it is read from the inbox.
    """
    config = common.settings()
    if body is None:
        kept = inbox.stored(config.DATABASE_URL, delivery_id)
        if kept is None:
            # The gateway answered 503 and forgot the row, but its push reached
            # the broker anyway (a timeout after Redis took it). Recording
            # nothing keeps the id free for GitHub's redelivery, which is stored.
            log.warning("delivery.not_in_inbox", extra={"event": event})
            return "not_in_inbox"
        if kept.body is None:
            return _fail(config, delivery_id, event, {}, "its body is past retention")
        body = kept.body
    payload = _parse(body)
    if payload is None:
        # The gateway parsed it already; only nesting too deep for this process
        # (or a message not sent by the gateway) gets here.
        return _fail(config, delivery_id, event, {}, "the body is not a JSON object")
    installation = payload.get("installation")
    if isinstance(installation, dict) and type(installation.get("id")) is int:
        bind(installation=installation["id"])
    if event == "workflow_run":
        return track_workflow_run(config, delivery_id, payload)
    try:
        decision = decide(event, payload, config, _permission_of)
    except common.OUTAGES:
        raise
    except TransientGitHubError as exc:
        common.retry_later(self, exc)
        return _fail(config, delivery_id, event, payload, f"permission check: {exc}")
    except PermanentGitHubError as exc:
        return _fail(config, delivery_id, event, payload, f"permission check: {exc}")
    except Exception as exc:
        # A bug, not bad luck: record it so the delivery is not silently gone.
        _fail(config, delivery_id, event, payload, f"internal error: {exc!r}"[:500])
        raise

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
        kwargs={
            "delivery_id": delivery_id,
            "trigger": decision.trigger,
            **forwarded(),
        },
    )
    log.info("delivery.job", extra={"event": event, "reason": decision.reason})
    return Verdict.JOB.value


def _fail(
    config: Settings, delivery_id: str, event: str, payload: dict, reason: str
) -> str:
    record_verdict(
        config.DATABASE_URL, delivery_id, event, payload, Verdict.FAILED, reason
    )
    log.error("delivery.failed", extra={"event": event, "reason": reason})
    return Verdict.FAILED.value


def track_workflow_run(config: Settings, delivery_id: str, payload: dict) -> str:
    """Record a CI run for its branch's conversation, and report a failed group."""
    try:
        run = parse_run(payload)
    except MalformedPayload as exc:
        reason = f"malformed payload: {exc}"
        record_verdict(
            config.DATABASE_URL,
            delivery_id,
            "workflow_run",
            payload,
            Verdict.IGNORED,
            reason,
        )
        log.info("delivery.ignored", extra={"event": "workflow_run", "reason": reason})
        return Verdict.IGNORED.value
    try:
        tracked = workflow_runs.track(config.DATABASE_URL, delivery_id, run)
    except common.OUTAGES:
        raise
    except Exception as exc:
        # A bug, not bad luck: record it so the delivery is not silently gone.
        _fail(
            config,
            delivery_id,
            "workflow_run",
            payload,
            f"internal error: {exc!r}"[:500],
        )
        raise
    verdict = Verdict.JOB if tracked.reported else Verdict.IGNORED
    record_verdict(
        config.DATABASE_URL,
        delivery_id,
        "workflow_run",
        payload,
        verdict,
        tracked.reason,
    )
    if tracked.reported and tracked.conversation_id is not None:
        # Queued after the commit; the callback row makes a second copy harmless.
        queue_callback(
            tracked.conversation_id, tracked.turn, tracked.event, delivery_id
        )
        if tracked.resumed:
            queue_run(tracked.conversation_id, delivery_id)
    log.info(
        "delivery.workflow_run",
        extra={
            "event": "workflow_run",
            "reason": tracked.reason,
            "conversation": str(tracked.conversation_id or ""),
        },
    )
    return verdict.value


# A sweep queues at most this many, so a large backlog drains over several runs.
REQUEUE_PER_SWEEP = 500


@app.task(name=SWEEP_INBOX_TASK, **common.OUTAGE_RETRY)
def sweep_inbox() -> int:
    """Queue again deliveries whose task was lost; drop bodies past retention."""
    config = common.settings()
    lost = inbox.unclassified(
        config.DATABASE_URL, config.HOOKLINE_INBOX_REQUEUE_AFTER, REQUEUE_PER_SWEEP
    )
    inbox.give_up(
        config.DATABASE_URL,
        [delivery.delivery_id for delivery in lost if not delivery.has_body],
        "its task was lost and its body is past retention",
    )
    for delivery in lost:
        if not delivery.has_body:
            continue
        # By reference, as the gateway sends a large delivery: the classify
        # pool reads the body, and a backlog of 25 MB rows stays out of the broker.
        app.send_task(
            CLASSIFY_TASK,
            kwargs={"delivery_id": delivery.delivery_id, "event": delivery.event},
        )
    dropped = inbox.drop_old_bodies(
        config.DATABASE_URL, config.HOOKLINE_INBOX_RETENTION, REQUEUE_PER_SWEEP
    )
    if lost or dropped:
        log.warning(
            "inbox.swept", extra={"requeued": len(lost), "bodies_dropped": dropped}
        )
    return len(lost)
