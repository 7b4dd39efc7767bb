"""The conversation pool: acknowledge the trigger, gather context, store, start."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

from celery import Task
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from hookline import lifecycle
from hookline.db import session_scope
from hookline.github import GitHubClient, GitHubError, TransientGitHubError
from hookline.models import Conversation, ConversationStatus, Delivery, Verdict
from tasks import common
from tasks.rendering import render
from tasks.triggers import Trigger
from workers.celery_app import RUN_AGENT_TASK, START_CONVERSATION_TASK, app

log = logging.getLogger(__name__)

# Long contexts are cut, with a note saying so, rather than refused or let through.
CONTEXT_COMMENTS = 30
COMMENT_CHARS = 4_000
DESCRIPTION_CHARS = 20_000


@dataclass(frozen=True)
class Context:
    """What GitHub tells about the issue or pull request behind a trigger."""

    issue: dict
    comments: list[dict]
    branch: str | None
    thread: list[dict] = field(default_factory=list)
    omitted_comments: int = 0


def _cut(text: str | None, limit: int) -> str:
    text = text or ""
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n… (cut: {len(text) - limit} more characters)"


def _shortened(comments: list[dict]) -> list[dict]:
    return [
        {**comment, "body": _cut(comment.get("body"), COMMENT_CHARS)}
        for comment in comments
    ]


def load_context(client: GitHubClient, trigger: Trigger) -> Context:
    """Fetch the issue or pull request, its comments, branch and review thread."""
    repository, number = trigger["repository"], trigger["number"]
    issue = client.issue(repository, number)
    issue = {**issue, "body": _cut(issue.get("body"), DESCRIPTION_CHARS)}
    earlier = [
        comment
        for comment in client.issue_comments(repository, number)
        if comment.get("id") != trigger["comment_id"]
    ]
    # The most recent comments matter most; older ones are counted, not shown.
    shown = earlier[-CONTEXT_COMMENTS:]
    omitted = max(int(issue.get("comments") or 0), len(earlier)) - len(shown)

    branch = trigger["head_ref"]
    if trigger["kind"] != "issue" and branch is None:
        branch = client.pull_request(repository, number)["head"]["ref"]
    thread: list[dict] = []
    if trigger["thread_id"] is not None:
        thread = [
            comment
            for comment in client.review_comments(repository, number)
            if trigger["thread_id"]
            in (comment.get("id"), comment.get("in_reply_to_id"))
            and comment.get("id") != trigger["comment_id"]
        ]
    return Context(
        issue=issue,
        comments=_shortened(shown),
        branch=branch,
        thread=_shortened(thread[-CONTEXT_COMMENTS:]),
        omitted_comments=max(omitted, 0),
    )


def render_instructions(trigger: Trigger, context: Context, override_dir: str) -> str:
    """Render what the agent is asked to do, from the template for the trigger."""
    return render(
        f"{trigger['kind']}.j2",
        override_dir,
        trigger=trigger,
        issue=context.issue,
        comments=context.comments,
        branch=context.branch,
        thread=context.thread,
        omitted_comments=context.omitted_comments,
    )


def store_conversation(
    database_url: str,
    delivery_id: str,
    trigger: Trigger,
    context: Context,
    instructions: str,
) -> tuple[uuid.UUID, str]:
    """Insert the conversation for a delivery, or find the one stored before."""
    conversation = Conversation(
        id=uuid.uuid4(),
        delivery_id=delivery_id,
        kind=trigger["kind"],
        repository=trigger["repository"],
        number=trigger["number"],
        installation_id=trigger["installation_id"],
        author=trigger["author"],
        trigger_comment_id=trigger["comment_id"],
        trigger_node_id=trigger["comment_node_id"],
        reaction_path=trigger["reaction_path"],
        reply_path=trigger["reply_path"],
        branch=context.branch,
        file_path=trigger["path"],
        line=trigger["line"],
        instructions=instructions,
        status=ConversationStatus.QUEUED.value,
    )
    try:
        with session_scope(database_url) as session:
            session.add(conversation)
            lifecycle.record(
                session,
                conversation.id,
                None,
                ConversationStatus.QUEUED,
                f"{trigger['kind']} trigger by {trigger['author']}",
            )
        return conversation.id, conversation.status
    except IntegrityError:
        existing = _existing(database_url, delivery_id)
        assert existing is not None
        return existing


def _existing(database_url: str, delivery_id: str) -> tuple[uuid.UUID, str] | None:
    query = select(Conversation.id, Conversation.status).where(
        Conversation.delivery_id == delivery_id
    )
    with session_scope(database_url) as session:
        row = session.execute(query).one_or_none()
    return (row.id, row.status) if row else None


def queue_run(conversation_id: uuid.UUID, delivery_id: str) -> None:
    """Hand a stored conversation to the agent pool."""
    app.send_task(
        RUN_AGENT_TASK,
        kwargs={"conversation_id": str(conversation_id), "delivery_id": delivery_id},
    )


@app.task(
    name=START_CONVERSATION_TASK,
    bind=True,
    base=common.GuardedTask,
    **common.OUTAGE_RETRY,
)
def start_conversation(self: Task, delivery_id: str, trigger: Trigger) -> str | None:
    """Start the conversation a trigger asks for, once per delivery."""
    config = common.settings()
    existing = _existing(config.DATABASE_URL, delivery_id)
    if existing is not None:
        conversation_id, status = existing
        if status == ConversationStatus.QUEUED:
            queue_run(conversation_id, delivery_id)
        log.info("conversation.exists", extra={"conversation": str(conversation_id)})
        return str(conversation_id)

    try:
        client = common.installation_client(trigger["installation_id"])
        client.add_reaction(trigger["reaction_path"], "eyes")
        context = load_context(client, trigger)
    except TransientGitHubError as exc:
        common.retry_later(self, exc)
        _give_up(config.DATABASE_URL, delivery_id, exc)
        return None
    except GitHubError as exc:
        _give_up(config.DATABASE_URL, delivery_id, exc)
        return None

    instructions = render_instructions(trigger, context, config.HOOKLINE_TEMPLATES_DIR)
    conversation_id, status = store_conversation(
        config.DATABASE_URL, delivery_id, trigger, context, instructions
    )
    if status == ConversationStatus.QUEUED:
        queue_run(conversation_id, delivery_id)
    log.info(
        "conversation.started",
        extra={
            "conversation": str(conversation_id),
            "repository": trigger["repository"],
            "number": trigger["number"],
            "kind": trigger["kind"],
        },
    )
    return str(conversation_id)


def _give_up(database_url: str, delivery_id: str, exc: GitHubError) -> None:
    log.error(
        "conversation.not_started", extra={"status": exc.status, "error": str(exc)}
    )
    with session_scope(database_url) as session:
        delivery = session.scalars(
            select(Delivery).where(Delivery.delivery_id == delivery_id)
        ).one_or_none()
        if delivery is not None:
            delivery.verdict = Verdict.FAILED.value
            delivery.reason = f"conversation not started: {exc}"
