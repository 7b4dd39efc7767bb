"""The callback pool: report each turn's outcome on GitHub, and record how it went.

A result goes where its request was: on the issue or pull request, or in the
review thread of an inline comment. It replaces the turn's "working on it"
comment when there is one, so a turn leaves one comment, not two.
"""

from __future__ import annotations

import logging
import uuid

from celery import Task
from sqlalchemy import select, update
from sqlalchemy.orm import selectinload

from hookline.db import session_scope
from hookline.github import GitHubClient, GitHubError, TransientGitHubError
from hookline.models import (
    Callback,
    CallbackStatus,
    Conversation,
    ConversationStatus,
    Turn,
)
from tasks import common
from tasks.rendering import render
from tasks.replies import callback_mark, find_marked, status_mark, with_mark
from tasks.workflow_runs import EVENT_PREFIX, reported_group
from workers.celery_app import POST_CALLBACK_TASK, app

log = logging.getLogger(__name__)

# A turn's outcome; other callbacks (a stop, failed CI) are comments of their own.
TURN_EVENTS = {
    ConversationStatus.FINISHED.value,
    ConversationStatus.AWAITING_INPUT.value,
    ConversationStatus.ERROR.value,
}


def callback_body(
    conversation: Conversation,
    turn: Turn,
    callback: Callback,
    handle: str,
    override_dir: str,
) -> str:
    """Render the comment that reports a turn's outcome, with its hidden mark."""
    event = callback.event
    if event == ConversationStatus.FINISHED:
        text = render(
            "finished.j2", override_dir, conversation=conversation, result=turn.reply
        )
    elif event == ConversationStatus.AWAITING_INPUT:
        text = render(
            "awaiting_input.j2",
            override_dir,
            conversation=conversation,
            turn=turn,
            question=turn.reply,
            summary=turn.summary,
            handle=handle,
        )
    elif event.startswith(EVENT_PREFIX):
        runs, resumed = reported_group(common.settings().DATABASE_URL, callback)
        text = render(
            "ci_failed.j2",
            override_dir,
            conversation=conversation,
            runs=runs,
            resumed=resumed,
        )
    elif event == ConversationStatus.STOPPED:
        text = render(
            "stopped.j2",
            override_dir,
            conversation=conversation,
            handle=handle,
            cause=_stop_cause(conversation),
        )
    else:
        text = render(
            "error.j2",
            override_dir,
            conversation=conversation,
            handle=handle,
            reason=conversation.error or "the agent stopped with an error",
        )
    marks = [callback_mark(conversation.id, callback.turn, event)]
    if event in TURN_EVENTS:
        # It replaces the turn's "working on it" comment, whose mark it keeps.
        marks.append(status_mark(conversation.id, turn.number))
    return with_mark(text, *marks)


def _stop_cause(conversation: Conversation) -> str:
    causes = [t.cause for t in conversation.transitions if t.to_status == "stopped"]
    return causes[-1] if causes else "stopped"


def _load(
    database_url: str, conversation_id: uuid.UUID, turn: int, event: str
) -> tuple[Conversation, Turn, Callback]:
    # Read after the session closes: the turns always, and for a stop notice the
    # transitions, which name its cause.
    conversation_loads = selectinload(Callback.conversation)
    options = [conversation_loads.selectinload(Conversation.turns)]
    if event == ConversationStatus.STOPPED:
        options.append(conversation_loads.selectinload(Conversation.transitions))
    with session_scope(database_url) as session:
        callback = session.scalars(
            select(Callback)
            .where(
                Callback.conversation_id == conversation_id,
                Callback.turn == turn,
                Callback.event == event,
            )
            .options(*options)
        ).one()
        conversation = callback.conversation
        turn_row = next(row for row in conversation.turns if row.number == turn)
        return conversation, turn_row, callback


def _record(
    database_url: str, callback_id: int, attempted: bool = False, **values: object
) -> None:
    # One UPDATE: the count goes up in the database, not from a row read first.
    if attempted:
        values["attempts"] = Callback.attempts + 1
    with session_scope(database_url) as session:
        session.execute(
            update(Callback)
            .where(Callback.id == callback_id)
            .values(**values)
            .execution_options(synchronize_session=False)
        )


def _kind_of(path: str) -> str:
    return "review_comment" if path.endswith("/replies") else "issue"


def post(
    client: GitHubClient,
    conversation: Conversation,
    callback: Callback,
    path: str,
    body: str,
) -> dict:
    """Post a callback's comment once, even if an earlier attempt died mid-way."""
    if callback.attempts:
        # An earlier attempt may have posted and died before recording it.
        earlier = find_marked(
            client,
            _kind_of(path),
            conversation.repository,
            conversation.number,
            callback_mark(conversation.id, callback.turn, callback.event),
            callback.created_at,
            common.settings().GITHUB_APP_ID,
        )
        if earlier is not None:
            log.info("callback.found_posted", extra={"comment": earlier.get("id")})
            return earlier
    # Counted before the POST, so that a crash after it still leaves a trace.
    _record(common.settings().DATABASE_URL, callback.id, attempted=True)
    return client.create_comment(path, body)


def deliver(
    client: GitHubClient,
    conversation: Conversation,
    turn: Turn,
    callback: Callback,
    body: str,
    override_dir: str,
) -> tuple[dict, str]:
    """Put a callback on GitHub; return the comment and its path.

    A turn's outcome replaces its "working on it" comment (editing is safe to
    repeat); without one it is a new comment. A stop or a failed CI report is
    a new comment where it belongs. After a stop or an error, the turns left
    unanswered have their "working on it" comments say so.
    """
    if callback.event not in TURN_EVENTS:
        path = callback.github_path or turn.reply_path
        comment = post(client, conversation, callback, path, body)
    elif turn.status_comment_id is not None and turn.status_comment_path:
        _record(common.settings().DATABASE_URL, callback.id, attempted=True)
        comment = client.edit_comment(turn.status_comment_path, body)
        path = turn.status_comment_path
    else:
        path = turn.reply_path
        comment = post(client, conversation, callback, path, body)
    if callback.event in ENDINGS:
        close_unanswered(client, conversation, callback, override_dir)
    return comment, path


# A conversation that ends so leaves any turn still waiting unanswered.
ENDINGS = {ConversationStatus.STOPPED.value, ConversationStatus.ERROR.value}


def close_unanswered(
    client: GitHubClient,
    conversation: Conversation,
    callback: Callback,
    override_dir: str,
) -> None:
    """Edit the "working on it" comments of turns that will get no answer.

    A stop cuts short the turn it finds running and those waiting behind it; an
    error ends the conversation before the waiting ones are read. Each says so,
    rather than promising an answer forever. Edits are safe to repeat.
    """
    stopped = callback.event == ConversationStatus.STOPPED
    for turn in conversation.turns:
        if turn.reply is not None or turn.status_comment_id is None:
            continue
        if not stopped and turn.number <= callback.turn:
            continue
        text = render(
            "unanswered.j2",
            override_dir,
            stopped=stopped,
            handle=common.settings().bot_handle,
        )
        client.edit_comment(
            turn.status_comment_path or "",
            with_mark(text, status_mark(conversation.id, turn.number)),
        )


# The trigger's reactions tell its state at a glance: eyes, then one of these.
REACTIONS = {
    ConversationStatus.FINISHED.value: "rocket",
    ConversationStatus.ERROR.value: "confused",
}


@app.task(
    name=POST_CALLBACK_TASK, bind=True, base=common.GuardedTask, **common.OUTAGE_RETRY
)
def post_callback(
    self: Task,
    conversation_id: str,
    event: str,
    delivery_id: str,
    turn: int = 1,
    github_event: str = "",
    installation: int | None = None,
) -> str:
    """Post a turn's result, question or error, or a stop, where it belongs.

    `event` is the callback's (finished, error…); `github_event` and
    `installation` are only for the log lines.
    """
    config = common.settings()
    url = config.DATABASE_URL
    conversation, turn_row, callback = _load(
        url, uuid.UUID(conversation_id), turn, event
    )
    if callback.status != CallbackStatus.PENDING:
        log.info("callback.already_done", extra={"status": callback.status})
        return callback.status

    templates = config.HOOKLINE_TEMPLATES_DIR
    body = callback_body(conversation, turn_row, callback, config.bot_handle, templates)
    try:
        client = common.installation_client(conversation.installation_id)
        comment, path = deliver(
            client, conversation, turn_row, callback, body, templates
        )
        if event in REACTIONS:
            client.add_reaction(turn_row.reaction_path, REACTIONS[event])
    except TransientGitHubError as exc:
        _record(url, callback.id, last_error=str(exc))
        common.retry_later(self, exc)
        _record(url, callback.id, status=CallbackStatus.FAILED.value)
        log.error("callback.gave_up", extra={"error": str(exc), "outcome": event})
        return CallbackStatus.FAILED.value
    except GitHubError as exc:
        _record(
            url, callback.id, status=CallbackStatus.FAILED.value, last_error=str(exc)
        )
        log.error(
            "callback.failed",
            extra={"status": exc.status, "error": str(exc), "outcome": event},
        )
        return CallbackStatus.FAILED.value

    _record(
        url,
        callback.id,
        status=CallbackStatus.POSTED.value,
        github_comment_id=comment.get("id"),
        github_path=path,
        last_error=None,
    )
    log.info(
        "callback.posted",
        extra={
            "outcome": event,
            "turn": turn,
            "path": path,
            "comment": comment.get("id"),
        },
    )
    return CallbackStatus.POSTED.value
