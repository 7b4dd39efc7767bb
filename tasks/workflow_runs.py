"""CI on a conversation's branch: track workflow runs, report a failed group once.

A `workflow_run` delivery on a branch that a conversation works on (its pull
request's head branch) is recorded under that conversation, grouped by commit.
Pending runs do nothing yet. When every run of a commit has completed and one
failed, the group is reported once: a comment lists the failed runs, and a
conversation awaiting input gets the failure as its next turn.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from hookline import lifecycle
from hookline.db import session_scope
from hookline.models import (
    Callback,
    Conversation,
    ConversationStatus,
    RunStatus,
    Turn,
    WorkflowRun,
    utcnow,
)
from tasks.triggers import MalformedPayload, object_field, positive_int, repository_name

log = logging.getLogger(__name__)

# GitHub's conclusions that mean the run did not pass.
FAILED_CONCLUSIONS = {
    "failure",
    "timed_out",
    "cancelled",
    "startup_failure",
    "action_required",
}
EVENT_PREFIX = "ci_failed:"
# A conversation that finished this recently still hears about CI on its branch
# (its agent may have pushed the commit being tested); a stopped one never.
FINISHED_WINDOW = 24 * 3600
OPEN = (
    ConversationStatus.QUEUED,
    ConversationStatus.RUNNING,
    ConversationStatus.AWAITING_INPUT,
)


@dataclass(frozen=True)
class Run:
    """What a workflow_run delivery says about one run."""

    id: int
    repository: str
    branch: str
    head_repository: str  # where the branch is: a fork's for a fork's PR
    head_sha: str
    name: str
    status: RunStatus
    html_url: str | None


@dataclass(frozen=True)
class Tracked:
    """What tracking a run led to, for the delivery's verdict."""

    reason: str
    conversation_id: uuid.UUID | None = None
    reported: bool = False
    resumed: bool = False
    event: str | None = None
    turn: int = 0


def run_status(status: object, conclusion: object) -> RunStatus:
    """Map GitHub's status and conclusion to PENDING, COMPLETED or FAILURE."""
    if status != "completed":
        return RunStatus.PENDING
    failed = isinstance(conclusion, str) and conclusion in FAILED_CONCLUSIONS
    return RunStatus.FAILURE if failed else RunStatus.COMPLETED


_SHA = re.compile(r"[0-9a-f]{40}")
# A workflow's name is written by whoever wrote the workflow file, a fork's
# author included: kept short, on one line, without Markdown's code marks.
_UNSAFE_IN_NAME = re.compile(r"[\x00-\x1f\x7f`]+")


def _display_name(name: object) -> str:
    text = _UNSAFE_IN_NAME.sub(" ", name if isinstance(name, str) else "").strip()
    return text[:100] or "workflow"


def parse_run(payload: dict) -> Run:
    """Read a workflow_run delivery; MalformedPayload if a field is unusable."""
    run = object_field(payload, "workflow_run")
    branch, sha = run.get("head_branch"), run.get("head_sha")
    if (
        not isinstance(branch, str)
        or not branch
        or len(branch) > 255
        or "\x00" in branch
    ):
        raise MalformedPayload("workflow_run.head_branch is not a branch name")
    if not isinstance(sha, str) or not _SHA.fullmatch(sha):
        raise MalformedPayload("workflow_run.head_sha is not a commit")
    head = run.get("head_repository")
    try:
        head_repository = repository_name({"repository": head})
    except MalformedPayload:
        raise MalformedPayload(
            "workflow_run.head_repository.full_name is not owner/name"
        ) from None
    url = run.get("html_url")
    return Run(
        id=positive_int(run, "id"),
        repository=repository_name(payload),
        branch=branch,
        head_repository=head_repository,
        head_sha=sha,
        name=_display_name(run.get("name")),
        status=run_status(run.get("status"), run.get("conclusion")),
        html_url=url if isinstance(url, str) and url.startswith("https://") else None,
    )


def _upsert(
    session: Session, run: Run, conversation_id: uuid.UUID, reported: bool
) -> None:
    values = {
        "id": run.id,
        "conversation_id": conversation_id,
        "name": run.name,
        "head_sha": run.head_sha,
        "status": run.status.value,
        "html_url": run.html_url,
        "reported": reported,
    }
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    statement = insert(WorkflowRun).values(**values)
    # A run's deliveries can arrive out of order: completed never goes back.
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[WorkflowRun.id],
            set_={"status": statement.excluded.status, "name": run.name},
            where=WorkflowRun.status == RunStatus.PENDING.value,
        )
    )


def track(database_url: str, delivery_id: str, run: Run) -> Tracked:
    """Record a run under its branch's conversation; report its group if due."""
    with session_scope(database_url) as session:
        recent = utcnow() - timedelta(seconds=FINISHED_WINDOW)
        conversation = session.scalars(
            select(Conversation)
            .where(
                Conversation.repository == run.repository,
                Conversation.branch == run.branch,
                # A fork's branch of the same name is another branch.
                Conversation.head_repository == run.head_repository,
                or_(
                    Conversation.status.in_([str(s) for s in OPEN]),
                    and_(
                        Conversation.status == ConversationStatus.FINISHED,
                        Conversation.finished_at > recent,
                    ),
                ),
            )
            .order_by(Conversation.created_at.desc())
            .limit(1)
            .with_for_update()
        ).first()
        if conversation is None:
            return Tracked(
                f"no open conversation works on {run.head_repository}:{run.branch}"
            )
        group = (
            WorkflowRun.conversation_id == conversation.id,
            WorkflowRun.head_sha == run.head_sha,
        )
        already = session.scalar(
            select(WorkflowRun.id).where(*group, WorkflowRun.reported).limit(1)
        )
        # A run that joins a group already reported is recorded, not reported.
        _upsert(session, run, conversation.id, reported=already is not None)
        statuses = [
            row for (row,) in session.execute(select(WorkflowRun.status).where(*group))
        ]
        done = sum(status != RunStatus.PENDING for status in statuses)
        summary = f"workflow run {run.name}: {done} of {len(statuses)} runs completed"
        if done < len(statuses) or RunStatus.FAILURE not in statuses:
            return Tracked(summary, conversation.id)
        # Flipped once: whoever flips the group reports it, nobody else.
        flipped = session.execute(
            update(WorkflowRun)
            .where(*group, WorkflowRun.reported.is_(False))
            .values(reported=True)
        ).rowcount
        if not flipped:
            return Tracked(f"{summary}; already reported", conversation.id)

        failed = session.scalars(
            select(WorkflowRun)
            .where(*group, WorkflowRun.status == RunStatus.FAILURE)
            .order_by(WorkflowRun.id)
        ).all()
        event = f"{EVENT_PREFIX}{run.head_sha[:12]}"
        session.add(
            Callback(
                conversation_id=conversation.id,
                turn=conversation.turn,
                event=event,
                github_path=conversation.reply_path,
                # The delivery that completed the group; a turn it added, if
                # any, tells the report that the conversation took it up.
                delivery_id=delivery_id,
            )
        )
        resumed = conversation.status == ConversationStatus.AWAITING_INPUT
        if resumed:
            _tell(session, conversation, delivery_id, failed)
        return Tracked(
            f"CI failed on {run.head_sha[:12]}: {len(failed)} run(s)",
            conversation.id,
            reported=True,
            resumed=resumed,
            event=event,
            turn=conversation.turn,
        )


def _tell(
    session: Session,
    conversation: Conversation,
    delivery_id: str,
    failed: Sequence[WorkflowRun],
) -> None:
    """Hand the failure to a conversation awaiting input, as its next turn."""
    latest = session.scalar(
        select(func.max(Turn.number)).where(Turn.conversation_id == conversation.id)
    )
    # Run ids and GitHub's links only: a run's name is written by whoever wrote
    # the workflow, a fork's author included, and the agent must not take
    # instructions from it.
    lines = [f"- run {row.id}: {row.html_url or 'no link'}" for row in failed]
    session.add(
        Turn(
            conversation_id=conversation.id,
            number=(latest or 0) + 1,
            delivery_id=delivery_id,
            kind=conversation.kind,
            author="hookline",
            request="CI failed on your branch. These runs failed:\n" + "\n".join(lines),
            reply_path=conversation.reply_path,
            reaction_path=conversation.reaction_path,
        )
    )
    lifecycle.record(
        session,
        conversation.id,
        conversation.status,
        ConversationStatus.QUEUED,
        f"CI failed: {len(failed)} run(s)",
    )
    conversation.status = ConversationStatus.QUEUED.value
    conversation.run_attempts = 0


def reported_group(
    database_url: str, callback: Callback
) -> tuple[list[WorkflowRun], bool]:
    """Return the failed runs a CI callback reports, and whether its conversation
    took the failure up as a turn."""
    prefix = callback.event.removeprefix(EVENT_PREFIX)
    with session_scope(database_url) as session:
        runs = session.scalars(
            select(WorkflowRun)
            .where(
                WorkflowRun.conversation_id == callback.conversation_id,
                WorkflowRun.head_sha.startswith(prefix),
                WorkflowRun.status == RunStatus.FAILURE,
            )
            .order_by(WorkflowRun.id)
        )
        taken_up = session.scalar(
            select(Turn.id).where(Turn.delivery_id == callback.delivery_id)
        )
        return list(runs), taken_up is not None
