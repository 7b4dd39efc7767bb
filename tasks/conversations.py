"""The conversation pool: acknowledge a request, then start, continue or stop.

A mention on an issue or pull request with an open conversation (queued,
running or awaiting input) becomes that conversation's next turn rather than a
second conversation: it resumes one awaiting input, and waits its turn behind
one that runs. `@bot stop` stops the open conversation.

Each turn gets one "working on it" comment, which the turn's result replaces
(see tasks/callbacks.py): one comment per turn, never a pile of them.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass, field

from celery import Task
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from config.logging import forwarded
from config.settings import Settings
from hookline import lifecycle
from hookline.db import session_scope
from hookline.github import GitHubClient, GitHubError, TransientGitHubError
from hookline.models import (
    Callback,
    Conversation,
    ConversationStatus,
    Delivery,
    Turn,
    Verdict,
    utcnow,
)
from hookline.runtime import runtime_for
from tasks import common
from tasks.rendering import render
from tasks.replies import find_marked, status_mark, with_mark
from tasks.triggers import Trigger
from workers.celery_app import (
    POST_CALLBACK_TASK,
    RUN_AGENT_TASK,
    START_CONVERSATION_TASK,
    app,
)

log = logging.getLogger(__name__)

# Long contexts are cut, with a note saying so, rather than refused or let through.
CONTEXT_COMMENTS = 30
COMMENT_CHARS = 4_000
DESCRIPTION_CHARS = 20_000

S = ConversationStatus
OPEN = (S.QUEUED, S.RUNNING, S.AWAITING_INPUT)


@dataclass(frozen=True)
class Context:
    """What GitHub tells about the issue or pull request behind a trigger."""

    issue: dict
    comments: list[dict]
    branch: str | None
    head_repository: str | None = None
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


def _latest_comments(
    client: GitHubClient, repository: str, number: int, issue: dict
) -> list[dict]:
    """Return the newest comments, at least CONTEXT_COMMENTS of them when there are.

    GitHub lists comments oldest first, a hundred a page: the newest are on the
    last page, and the one before it when the last is short.
    """
    total = issue.get("comments")
    pages = max(1, -(-total // 100)) if type(total) is int and total > 0 else 1
    comments = client.issue_comments(repository, number, page=pages)
    if pages > 1 and len(comments) <= CONTEXT_COMMENTS:
        comments = client.issue_comments(repository, number, page=pages - 1) + comments
    return comments


def load_context(client: GitHubClient, trigger: Trigger) -> Context:
    """Fetch the issue or pull request, its comments, branch and review thread."""
    repository, number = trigger["repository"], trigger["number"]
    issue = client.issue(repository, number)
    issue = {**issue, "body": _cut(issue.get("body"), DESCRIPTION_CHARS)}
    earlier = [
        comment
        for comment in _latest_comments(client, repository, number, issue)
        if comment.get("id") != trigger["comment_id"]
    ]
    # The most recent comments matter most; older ones are counted, not shown.
    shown = earlier[-CONTEXT_COMMENTS:]
    omitted = max(int(issue.get("comments") or 0), len(earlier)) - len(shown)

    branch, head_repository = trigger["head_ref"], trigger.get("head_repository")
    if trigger["kind"] != "issue" and branch is None:
        head = client.pull_request(repository, number)["head"]
        branch = head["ref"]
        repo = head.get("repo")
        head_repository = repo.get("full_name") if isinstance(repo, dict) else None
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
        head_repository=head_repository,
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


@dataclass(frozen=True)
class Stored:
    """Where a request landed: which conversation, which turn, in what state."""

    conversation_id: uuid.UUID
    turn: int
    status: str  # the conversation's status once the request was stored
    started: bool  # True when the request started the conversation


def _lock_issue(session: Session, repository: str, number: int) -> None:
    """Serialise requests on one issue or pull request until the commit.

    Two mentions at once must not both find no open conversation and start
    two. PostgreSQL takes a transaction-scoped advisory lock; SQLite, the
    demo's database, serialises its writers anyway.
    """
    if session.get_bind().dialect.name != "postgresql":
        return
    digest = hashlib.blake2b(f"{repository.lower()}#{number}".encode(), digest_size=8)
    key = int.from_bytes(digest.digest(), "big", signed=True)
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def open_conversation(
    session: Session, repository: str, number: int, lock: bool = False
) -> Conversation | None:
    """Return the open (queued, running or awaiting) conversation on an issue."""
    query = (
        select(Conversation)
        .where(
            Conversation.repository == repository,
            Conversation.number == number,
            Conversation.status.in_([str(status) for status in OPEN]),
        )
        .order_by(Conversation.created_at.desc())
        .limit(1)
    )
    if lock:
        query = query.with_for_update()
    return session.scalars(query).first()


def _turn(delivery_id: str, trigger: Trigger, number: int, request: str) -> Turn:
    return Turn(
        number=number,
        delivery_id=delivery_id,
        kind=trigger["kind"],
        author=trigger["author"],
        request=request,
        reply_path=trigger["reply_path"],
        reaction_path=trigger["reaction_path"],
    )


def store_request(
    database_url: str,
    delivery_id: str,
    trigger: Trigger,
    follow_up: str,
    first: tuple[str, Context] | None,
) -> Stored | None:
    """Add a request to the open conversation on its issue, or start one.

    `follow_up` is the request as a later turn; `first` is (instructions,
    its context) for a new conversation. With `first` None the caller saw an open
    conversation: if it closed meanwhile, None comes back, and the caller loads
    the context and asks again.
    """
    repository, number = trigger["repository"], trigger["number"]
    with session_scope(database_url) as session:
        _lock_issue(session, repository, number)
        conversation = open_conversation(session, repository, number, lock=True)
        if conversation is not None:
            latest = session.scalar(
                select(func.max(Turn.number)).where(
                    Turn.conversation_id == conversation.id
                )
            )
            turn = _turn(delivery_id, trigger, (latest or 0) + 1, follow_up)
            turn.conversation_id = conversation.id
            session.add(turn)
            if conversation.status == ConversationStatus.AWAITING_INPUT:
                lifecycle.record(
                    session,
                    conversation.id,
                    conversation.status,
                    ConversationStatus.QUEUED,
                    f"follow-up from {trigger['author']} (turn {turn.number})",
                )
                conversation.status = ConversationStatus.QUEUED.value
                conversation.run_attempts = 0
            return Stored(conversation.id, turn.number, conversation.status, False)
        if first is None:
            return None

        instructions, context = first
        conversation = Conversation(
            id=uuid.uuid4(),
            delivery_id=delivery_id,
            kind=trigger["kind"],
            repository=repository,
            number=number,
            installation_id=trigger["installation_id"],
            author=trigger["author"],
            trigger_comment_id=trigger["comment_id"],
            trigger_node_id=trigger["comment_node_id"],
            reaction_path=trigger["reaction_path"],
            reply_path=trigger["reply_path"],
            branch=context.branch,
            head_repository=context.head_repository,
            file_path=trigger["path"],
            line=trigger["line"],
            instructions=instructions,
            status=ConversationStatus.QUEUED.value,
            turn=1,
        )
        conversation.turns.append(_turn(delivery_id, trigger, 1, instructions))
        session.add(conversation)
        lifecycle.record(
            session,
            conversation.id,
            None,
            ConversationStatus.QUEUED,
            f"{trigger['kind']} trigger by {trigger['author']}",
        )
        return Stored(conversation.id, 1, ConversationStatus.QUEUED.value, True)


def known_request(database_url: str, delivery_id: str) -> Stored | None:
    """Return where an earlier attempt of this delivery stored its request."""
    query = (
        select(Turn.conversation_id, Turn.number, Conversation.status)
        .join(Conversation)
        .where(Turn.delivery_id == delivery_id)
    )
    with session_scope(database_url) as session:
        row = session.execute(query).one_or_none()
    if row is None:
        return None
    return Stored(row.conversation_id, row.number, row.status, row.number == 1)


def _store(
    client: GitHubClient, config: Settings, delivery_id: str, trigger: Trigger
) -> Stored:
    follow_up = render("follow_up.j2", config.HOOKLINE_TEMPLATES_DIR, trigger=trigger)
    url = config.DATABASE_URL
    try:
        stored = store_request(url, delivery_id, trigger, follow_up, None)
        if stored is None:
            context = load_context(client, trigger)
            instructions = render_instructions(
                trigger, context, config.HOOKLINE_TEMPLATES_DIR
            )
            stored = store_request(
                url, delivery_id, trigger, follow_up, (instructions, context)
            )
    except IntegrityError:
        # A second copy of this delivery stored it first.
        stored = known_request(url, delivery_id)
    assert stored is not None
    return stored


def ensure_status_comment(
    client: GitHubClient, database_url: str, stored: Stored, override_dir: str
) -> None:
    """Post the turn's "working on it" comment once; its result will replace it."""
    with session_scope(database_url) as session:
        turn, conversation = session.execute(
            select(Turn, Conversation)
            .join(Turn.conversation)
            .where(Turn.at(stored.conversation_id, stored.turn))
        ).one()
        if turn.status_comment_id is not None or turn.reply is not None:
            return
        attempted = turn.status_comment_path is not None
        # Marked before the POST: a retry then knows to look for an earlier post.
        turn.status_comment_path = turn.reply_path
        repository, number = conversation.repository, conversation.number
        kind, reply_path, created = turn.kind, turn.reply_path, turn.created_at
        # The first turn starts at once; a later one may wait for the one running.
        waiting = stored.turn > 1 and conversation.status != ConversationStatus.QUEUED

    mark = status_mark(stored.conversation_id, stored.turn)
    comment = (
        find_marked(
            client,
            kind,
            repository,
            number,
            mark,
            created,
            common.settings().GITHUB_APP_ID,
        )
        if attempted
        else None
    )
    if comment is not None:
        log.info("conversation.found_status_comment", extra={"comment": comment["id"]})
    else:
        text_ = render(
            "waiting.j2" if waiting else "working.j2",
            override_dir,
            turn=stored.turn,
        )
        comment = client.create_comment(reply_path, with_mark(text_, mark))
    with session_scope(database_url) as session:
        session.execute(
            update(Turn)
            .where(Turn.at(stored.conversation_id, stored.turn))
            .values(
                status_comment_id=comment.get("id"),
                status_comment_path=client.path_of(comment),
            )
        )
    log.info(
        "conversation.status_comment",
        extra={"conversation": str(stored.conversation_id), "turn": stored.turn},
    )


def queue_run(conversation_id: uuid.UUID, delivery_id: str) -> None:
    """Hand a queued conversation to the agent pool."""
    app.send_task(
        RUN_AGENT_TASK,
        kwargs={
            "conversation_id": str(conversation_id),
            "delivery_id": delivery_id,
            **forwarded(),
        },
    )


def queue_callback(
    conversation_id: uuid.UUID, turn: int, event: str, delivery_id: str
) -> None:
    """Hand a callback to the callback pool."""
    app.send_task(
        POST_CALLBACK_TASK,
        kwargs={
            "conversation_id": str(conversation_id),
            "turn": turn,
            "event": event,
            "delivery_id": delivery_id,
            **forwarded(),
        },
    )


@app.task(
    name=START_CONVERSATION_TASK,
    bind=True,
    base=common.GuardedTask,
    **common.OUTAGE_RETRY,
)
def start_conversation(
    self: Task,
    delivery_id: str,
    trigger: Trigger,
    github_event: str = "",
    installation: int | None = None,
) -> str | None:
    """Start a conversation, continue the open one, or stop it, once per delivery.

    `github_event` and `installation` are only for the log lines (see
    config/logging.py); the worker binds them before the task runs.
    """
    config = common.settings()
    if trigger.get("command") == "stop":
        return stop_conversation(self, config, delivery_id, trigger)

    stored = known_request(config.DATABASE_URL, delivery_id)
    try:
        client = common.installation_client(trigger["installation_id"])
        if stored is None:
            client.add_reaction(trigger["reaction_path"], "eyes")
            stored = _store(client, config, delivery_id, trigger)
    except TransientGitHubError as exc:
        common.retry_later(self, exc)
        _give_up(config.DATABASE_URL, delivery_id, exc)
        return None
    except GitHubError as exc:
        _give_up(config.DATABASE_URL, delivery_id, exc)
        return None

    try:
        ensure_status_comment(
            client, config.DATABASE_URL, stored, config.HOOKLINE_TEMPLATES_DIR
        )
    except TransientGitHubError as exc:
        common.retry_later(self, exc)
        log.error("conversation.no_status_comment", extra={"error": str(exc)})
    except GitHubError as exc:
        # The result is then posted as a new comment: worse, but not lost.
        log.error("conversation.no_status_comment", extra={"error": str(exc)})

    if stored.status == ConversationStatus.QUEUED:
        queue_run(stored.conversation_id, delivery_id)
    log.info(
        "conversation.started" if stored.started else "conversation.follow_up",
        extra={
            "conversation": str(stored.conversation_id),
            "turn": stored.turn,
            "status": stored.status,
            "repository": trigger["repository"],
            "number": trigger["number"],
            "kind": trigger["kind"],
        },
    )
    return str(stored.conversation_id)


def mark_stopped(
    database_url: str, delivery_id: str, trigger: Trigger
) -> tuple[uuid.UUID, int, str | None] | None:
    """Stop the open conversation on the trigger's issue and owe a callback for it.

    Returns the conversation, its turn and its runtime's id, or None when
    nothing was open. A second copy of the delivery finds its callback again.
    """
    repository, number = trigger["repository"], trigger["number"]
    with session_scope(database_url) as session:
        earlier = session.execute(
            select(Callback.conversation_id, Callback.turn, Conversation.runtime_ref)
            .join(Conversation)
            .where(Callback.delivery_id == delivery_id)
        ).one_or_none()
        if earlier is not None:
            return earlier.conversation_id, earlier.turn, earlier.runtime_ref
        _lock_issue(session, repository, number)
        conversation = open_conversation(session, repository, number, lock=True)
        if conversation is None:
            return None
        stop_open(
            session,
            conversation,
            f"stopped by {trigger['author']}",
            trigger["reply_path"],
            delivery_id,
        )
        return conversation.id, conversation.turn, conversation.runtime_ref


def stop_open(
    session: Session,
    conversation: Conversation,
    cause: str,
    reply_path: str,
    delivery_id: str | None = None,
) -> None:
    """Stop an open conversation in this session and owe the notice at `reply_path`.

    The caller holds the conversation's row lock; a running agent sees the stop
    at its next heartbeat.
    """
    lifecycle.record(
        session,
        conversation.id,
        conversation.status,
        ConversationStatus.STOPPED,
        cause,
    )
    conversation.status = ConversationStatus.STOPPED.value
    conversation.lease_expires_at = None
    conversation.finished_at = utcnow()
    session.add(
        Callback(
            conversation_id=conversation.id,
            turn=conversation.turn,
            event=ConversationStatus.STOPPED.value,
            delivery_id=delivery_id,
            github_path=reply_path,
        )
    )


def stop_conversation(
    task: Task, config: Settings, delivery_id: str, trigger: Trigger
) -> str | None:
    """Stop the open conversation where `@bot stop` was said, and say so."""
    try:
        client = common.installation_client(trigger["installation_id"])
        client.add_reaction(trigger["reaction_path"], "eyes")
        stopped = mark_stopped(config.DATABASE_URL, delivery_id, trigger)
        if stopped is None:
            # Nothing to stop: a confused face says so without another comment.
            client.add_reaction(trigger["reaction_path"], "confused")
            log.info("conversation.nothing_to_stop")
            return None
    except TransientGitHubError as exc:
        common.retry_later(task, exc)
        _give_up(config.DATABASE_URL, delivery_id, exc)
        return None
    except GitHubError as exc:
        _give_up(config.DATABASE_URL, delivery_id, exc)
        return None

    conversation_id, turn, runtime_ref = stopped
    if runtime_ref:
        # A runtime that keeps its own conversation is told too; the command
        # runner's process sees the stop at its next heartbeat.
        runtime_for(config).stop(runtime_ref)
    queue_callback(conversation_id, turn, ConversationStatus.STOPPED, delivery_id)
    log.info(
        "conversation.stopped",
        extra={"conversation": str(conversation_id), "by": trigger["author"]},
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
