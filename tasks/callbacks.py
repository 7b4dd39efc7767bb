"""The callback pool: report a conversation's end on GitHub, and record how it went.

A result goes where the trigger was: a comment on the issue or pull request, or a
reply in the review thread of an inline comment.
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta

from celery import Task
from sqlalchemy import select

from hookline.db import session_scope
from hookline.github import GitHubClient, GitHubError, TransientGitHubError
from hookline.models import Callback, CallbackStatus, Conversation, ConversationStatus
from tasks import common
from tasks.rendering import render
from workers.celery_app import POST_CALLBACK_TASK, app

log = logging.getLogger(__name__)


def marker(conversation_id: uuid.UUID, event: str) -> str:
    """Return the hidden mark that identifies one callback's comment on GitHub."""
    return f"hookline:callback={conversation_id}/{event}"


def callback_body(conversation: Conversation, handle: str, override_dir: str) -> str:
    """Render the comment that reports how a conversation ended, with its mark."""
    if conversation.status == ConversationStatus.FINISHED:
        text = render(
            "finished.j2",
            override_dir,
            conversation=conversation,
            result=conversation.result or "",
        )
    else:
        text = render(
            "error.j2",
            override_dir,
            conversation=conversation,
            handle=handle,
            reason=conversation.error or "the agent stopped with an error",
        )
    # Appended here, not in the templates, so an operator's template cannot drop
    # what makes a repeated post detectable.
    return f"{text}\n\n<!-- {marker(conversation.id, conversation.status)} -->"


def find_posted(
    client: GitHubClient, conversation: Conversation, callback: Callback
) -> dict | None:
    """Return the comment an earlier attempt of this callback posted, if any."""
    # A minute of slack for clocks; GitHub filters on the comment's update time.
    since = (callback.created_at - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    if conversation.kind == "review_comment":
        comments = client.review_comments(
            conversation.repository, conversation.number, since
        )
    else:
        comments = client.issue_comments(
            conversation.repository, conversation.number, since=since
        )
    mark = marker(conversation.id, callback.event)
    return next((c for c in comments if mark in (c.get("body") or "")), None)


def _load(
    database_url: str, conversation_id: uuid.UUID, event: str
) -> tuple[Conversation, Callback]:
    with session_scope(database_url) as session:
        callback = session.scalars(
            select(Callback).where(
                Callback.conversation_id == conversation_id, Callback.event == event
            )
        ).one()
        return callback.conversation, callback


def _record(
    database_url: str, callback_id: int, attempted: bool = False, **values: object
) -> None:
    with session_scope(database_url) as session:
        callback = session.get_one(Callback, callback_id)
        callback.attempts += int(attempted)
        for name, value in values.items():
            setattr(callback, name, value)


def post(
    client: GitHubClient, conversation: Conversation, callback: Callback, body: str
) -> dict:
    """Post a callback's comment once, even if an earlier attempt died mid-way."""
    if callback.attempts:
        # An earlier attempt may have posted and died before recording it.
        earlier = find_posted(client, conversation, callback)
        if earlier is not None:
            log.info("callback.found_posted", extra={"comment": earlier.get("id")})
            return earlier
    # Counted before the POST, so that a crash after it still leaves a trace.
    _record(common.settings().DATABASE_URL, callback.id, attempted=True)
    return client.create_comment(conversation.reply_path, body)


@app.task(
    name=POST_CALLBACK_TASK, bind=True, base=common.GuardedTask, **common.OUTAGE_RETRY
)
def post_callback(
    self: Task, conversation_id: str, event: str, delivery_id: str
) -> str:
    """Post a conversation's result or error notice where its trigger was."""
    config = common.settings()
    url = config.DATABASE_URL
    conversation, callback = _load(url, uuid.UUID(conversation_id), event)
    if callback.status != CallbackStatus.PENDING:
        log.info("callback.already_done", extra={"status": callback.status})
        return callback.status

    body = callback_body(conversation, config.bot_handle, config.HOOKLINE_TEMPLATES_DIR)
    try:
        client = common.installation_client(conversation.installation_id)
        comment = post(client, conversation, callback, body)
        # The trigger's reactions tell its state at a glance: eyes, then this.
        finished = conversation.status == ConversationStatus.FINISHED
        client.add_reaction(
            conversation.reaction_path, "rocket" if finished else "confused"
        )
    except TransientGitHubError as exc:
        _record(url, callback.id, last_error=str(exc))
        common.retry_later(self, exc)
        _record(url, callback.id, status=CallbackStatus.FAILED.value)
        log.error("callback.gave_up", extra={"error": str(exc), "event": event})
        return CallbackStatus.FAILED.value
    except GitHubError as exc:
        _record(
            url, callback.id, status=CallbackStatus.FAILED.value, last_error=str(exc)
        )
        log.error(
            "callback.failed",
            extra={"status": exc.status, "error": str(exc), "event": event},
        )
        return CallbackStatus.FAILED.value

    _record(
        url,
        callback.id,
        status=CallbackStatus.POSTED.value,
        github_comment_id=comment.get("id"),
        github_path=conversation.reply_path,
        last_error=None,
    )
    log.info(
        "callback.posted",
        extra={
            "event": event,
            "path": conversation.reply_path,
            "comment": comment.get("id"),
        },
    )
    return CallbackStatus.POSTED.value
