"""`hookline`: the operator's command line.

    hookline send FILE --event EVENT     sign a payload file, post it as GitHub would
    hookline deliveries [--limit N]      recent deliveries and what became of them
    hookline explain DELIVERY_ID         the whole trace of one delivery
    hookline conversations [--limit N]   recent conversations and their state
    hookline replay DELIVERY_ID          classify a stored delivery again
    hookline failed [--limit N]          GitHub writes that gave up (dead letters)
    hookline retry CALLBACK              try one of them again
    hookline stop CONVERSATION           stop an open conversation and say so

Every command takes --json. Exit codes: 0 done, 1 not found or refused, 2 usage
or configuration error, 3 a service did not answer.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from config.settings import ConfigError, Settings, load_settings
from hookline import inbox
from hookline.db import session_scope
from hookline.devtools import send_delivery
from hookline.models import (
    Callback,
    CallbackStatus,
    Conversation,
    Delivery,
    GitHubCall,
    Turn,
)
from hookline.runtime import runtime_for
from tasks.conversations import OPEN, queue_callback, stop_open
from workers.celery_app import CLASSIFY_TASK, create_celery

NOT_FOUND, USAGE, UNAVAILABLE = 1, 2, 3


class CommandError(Exception):
    """A command failed in a way the user should read, with its exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _send(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    path = Path(args.file)
    try:
        body = path.read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}", USAGE) from None
    secret = settings.require_webhook_secret().decode()
    delivery_id = args.delivery or str(uuid.uuid4())
    try:
        response = send_delivery(args.url, secret, args.event, body, delivery_id)
    except requests.RequestException as exc:
        raise CommandError(
            f"the gateway at {args.url} did not answer ({type(exc).__name__})",
            UNAVAILABLE,
        ) from None
    try:
        answer = response.json()
    except ValueError:
        answer = {"body": response.text[:200]}
    result = {"delivery": delivery_id, "status": response.status_code, "answer": answer}
    if response.status_code >= 400:
        raise CommandError(json.dumps(result), NOT_FOUND)
    return result


def _delivery_row(delivery: Delivery) -> dict[str, Any]:
    return {
        "delivery": delivery.delivery_id,
        "event": delivery.event,
        "action": delivery.action,
        "repository": delivery.repository,
        "verdict": delivery.verdict,
        "reason": delivery.reason,
        "at": delivery.created_at.isoformat(timespec="seconds"),
    }


def _deliveries(args: argparse.Namespace, settings: Settings) -> list[dict[str, Any]]:
    query = select(Delivery).order_by(Delivery.id.desc()).limit(args.limit)
    with session_scope(settings.DATABASE_URL) as session:
        return [_delivery_row(row) for row in session.scalars(query)]


def _conversation_row(conversation: Conversation) -> dict[str, Any]:
    return {
        "conversation": str(conversation.id),
        "delivery": conversation.delivery_id,
        "kind": conversation.kind,
        "repository": conversation.repository,
        "number": conversation.number,
        "status": conversation.status,
        "turns": conversation.turn,
        "error": conversation.error,
        "at": conversation.created_at.isoformat(timespec="seconds"),
        "updated": conversation.updated_at.isoformat(timespec="seconds"),
    }


def _conversations(
    args: argparse.Namespace, settings: Settings
) -> list[dict[str, Any]]:
    query = select(Conversation).order_by(Conversation.created_at.desc())
    with session_scope(settings.DATABASE_URL) as session:
        return [
            _conversation_row(row) for row in session.scalars(query.limit(args.limit))
        ]


def _find_conversation(session: Session, delivery_id: str) -> Conversation | None:
    """Return the conversation a delivery started, continued or stopped."""
    turn = session.scalars(select(Turn).where(Turn.delivery_id == delivery_id)).first()
    if turn is not None:
        return turn.conversation
    callback = session.scalars(
        select(Callback).where(Callback.delivery_id == delivery_id)
    ).first()
    if callback is not None:
        return callback.conversation
    return session.scalars(
        select(Conversation).where(Conversation.delivery_id == delivery_id)
    ).first()


def _explain(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    with session_scope(settings.DATABASE_URL) as session:
        # A conversation id (as an error notice gives it) stands for the
        # delivery that started the conversation.
        started = _conversation_by_id(session, args.delivery)
        if started is not None:
            args.delivery = started.delivery_id
        delivery = session.scalars(
            select(Delivery).where(Delivery.delivery_id == args.delivery)
        ).one_or_none()
        conversation = _find_conversation(session, args.delivery)
        calls = session.scalars(
            select(GitHubCall)
            .where(GitHubCall.delivery_id == args.delivery)
            .order_by(GitHubCall.id)
        ).all()
        if delivery is None and conversation is None:
            raise CommandError(
                f"no delivery {args.delivery} is recorded: the gateway refused it "
                "or answered it itself (a ping is answered so), or it never "
                "reached Hookline",
                NOT_FOUND,
            )
        trace: dict[str, Any] = {
            "delivery": _delivery_row(delivery) if delivery else None
        }
        if conversation is not None:
            trace["conversation"] = _conversation_row(conversation) | {
                "reaction_path": conversation.reaction_path,
                "reply_path": conversation.reply_path,
                "result": conversation.result,
            }
            trace["turns"] = [
                {
                    "turn": turn.number,
                    "delivery": turn.delivery_id,
                    "author": turn.author,
                    "request": _first_line(turn.request),
                    "reply": _first_line(turn.reply),
                    "this_delivery": turn.delivery_id == args.delivery,
                }
                for turn in conversation.turns
            ]
            trace["transitions"] = [
                {
                    "at": row.at.isoformat(timespec="seconds"),
                    "from": row.from_status,
                    "to": row.to_status,
                    "cause": row.cause,
                }
                for row in conversation.transitions
            ]
            callbacks = session.scalars(
                select(Callback)
                .where(Callback.conversation_id == conversation.id)
                .order_by(Callback.id)
            )
            trace["callbacks"] = [
                {
                    "turn": callback.turn,
                    "event": callback.event,
                    "status": callback.status,
                    "attempts": callback.attempts,
                    "last_error": callback.last_error,
                    "comment": callback.github_comment_id,
                    "path": callback.github_path,
                }
                for callback in callbacks
            ]
        trace["github_calls"] = [
            {
                "at": call.at.isoformat(timespec="seconds"),
                "task": call.task,
                "method": call.method,
                "path": call.path,
                "status": call.status or "no answer",
                "ms": call.milliseconds,
            }
            for call in calls
        ]
        return trace


def _conversation_by_id(session: Session, text: str) -> Conversation | None:
    try:
        conversation_id = uuid.UUID(text)
    except ValueError:
        return None
    return session.get(Conversation, conversation_id)


def _first_line(text: str | None, limit: int = 100) -> str:
    line = next((line for line in (text or "").splitlines() if line.strip()), "")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _failed(args: argparse.Namespace, settings: Settings) -> list[dict[str, Any]]:
    query = (
        select(Callback)
        .where(Callback.status == CallbackStatus.FAILED.value)
        .order_by(Callback.updated_at.desc())
        .limit(args.limit)
    )
    with session_scope(settings.DATABASE_URL) as session:
        return [
            {
                "callback": row.id,
                "conversation": str(row.conversation_id),
                "turn": row.turn,
                "event": row.event,
                "attempts": row.attempts,
                "last_error": row.last_error,
                "at": row.updated_at.isoformat(timespec="seconds"),
            }
            for row in session.scalars(query)
        ]


def _retry(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    with session_scope(settings.DATABASE_URL) as session:
        callback = session.get(Callback, args.callback, with_for_update=True)
        if callback is None:
            raise CommandError(f"no callback {args.callback}", NOT_FOUND)
        if callback.status != CallbackStatus.FAILED:
            raise CommandError(
                f"callback {args.callback} is {callback.status}, not failed", NOT_FOUND
            )
        # Its attempts are kept: the retry first looks for a comment an earlier
        # attempt may have posted after all.
        callback.status = CallbackStatus.PENDING.value
        conversation_id, turn, event = (
            callback.conversation_id,
            callback.turn,
            callback.event,
        )
        delivery_id = callback.conversation.delivery_id
    try:
        queue_callback(conversation_id, turn, event, delivery_id)
    except Exception as exc:
        with session_scope(settings.DATABASE_URL) as session:
            session.get_one(Callback, args.callback).status = CallbackStatus.FAILED
        raise CommandError(
            f"callback {args.callback} could not be queued ({type(exc).__name__}); "
            "it is still failed: try again once the broker answers",
            UNAVAILABLE,
        ) from None
    return {"callback": args.callback, "conversation": str(conversation_id)}


def _replay(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    original = inbox.stored(settings.DATABASE_URL, args.delivery)
    if original is None:
        raise CommandError(f"no delivery {args.delivery} is in the inbox", NOT_FOUND)
    if original.body is None:
        raise CommandError(
            f"delivery {args.delivery} is past HOOKLINE_INBOX_RETENTION: its body "
            "is gone",
            NOT_FOUND,
        )
    # A new id: everything Hookline does is keyed by delivery id, so the replay
    # is classified afresh instead of being taken for the original.
    copy_id = f"{args.delivery[:36]}-replay-{uuid.uuid4().hex[:8]}"
    inbox.store_copy(settings.DATABASE_URL, original, copy_id)
    try:
        create_celery(settings, publisher=True).send_task(
            CLASSIFY_TASK,
            kwargs={
                "delivery_id": copy_id,
                "event": original.event,
                "body": original.body,
            },
        )
    except Exception as exc:
        raise CommandError(
            f"replay {copy_id} is stored but could not be queued "
            f"({type(exc).__name__}); the inbox sweep queues it within minutes",
            UNAVAILABLE,
        ) from None
    return {"delivery": copy_id, "replay_of": args.delivery, "event": original.event}


def _stop(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    try:
        conversation_id = uuid.UUID(args.conversation)
    except ValueError:
        raise CommandError(
            f"{args.conversation} is not a conversation id", USAGE
        ) from None
    with session_scope(settings.DATABASE_URL) as session:
        conversation = session.get(Conversation, conversation_id, with_for_update=True)
        if conversation is None:
            raise CommandError(f"no conversation {conversation_id}", NOT_FOUND)
        if conversation.status not in OPEN:
            raise CommandError(
                f"conversation {conversation_id} is {conversation.status}: "
                "there is nothing to stop",
                NOT_FOUND,
            )
        turn = conversation.turns[-1] if conversation.turns else None
        stop_open(
            session,
            conversation,
            f"stopped by an operator: {args.reason}",
            turn.reply_path if turn else conversation.reply_path,
        )
        stopped = _conversation_row(conversation)
        turn_number, runtime_ref = conversation.turn, conversation.runtime_ref
        delivery_id = conversation.delivery_id
    if runtime_ref:
        runtime_for(settings).stop(runtime_ref)
    try:
        queue_callback(conversation_id, turn_number, "stopped", delivery_id)
    except Exception as exc:
        raise CommandError(
            f"conversation {conversation_id} is stopped, but its notice could not be "
            f"queued ({type(exc).__name__}); the sweeper queues it later",
            UNAVAILABLE,
        ) from None
    return stopped


def _print_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    if not rows:
        print("(none)")
        return
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns))


def _print_trace(trace: dict[str, Any]) -> None:
    delivery = trace["delivery"]
    if delivery:
        print(
            f"delivery {delivery['delivery']}: {delivery['event']}/{delivery['action']}"
        )
        print(f"  repository {delivery['repository']}, received {delivery['at']}")
        print(f"  verdict    {delivery['verdict']}: {delivery['reason']}")
    conversation = trace.get("conversation")
    if conversation:
        print(f"conversation {conversation['conversation']} ({conversation['kind']})")
        print(f"  status     {conversation['status']}")
        print(f"  reaction   {conversation['reaction_path']}")
        if conversation["error"]:
            print(f"  error      {conversation['error']}")
    for turn in trace.get("turns", []):
        mark = "  <- this delivery" if turn["this_delivery"] else ""
        print(f"turn {turn['turn']} by {turn['author']}{mark}")
        print(f"  asked      {turn['request']}")
        print(f"  answered   {turn['reply'] or '(not yet)'}")
    for move in trace.get("transitions", []):
        print(f"{move['at']}  {move['from'] or '-'} -> {move['to']}: {move['cause']}")
    for callback in trace.get("callbacks", []):
        turn = f" (turn {callback['turn']})" if callback["turn"] != 1 else ""
        print(f"callback {callback['event']}{turn}: {callback['status']}")
        print(f"  attempts   {callback['attempts']}")
        if callback["path"]:
            print(f"  comment    {callback['comment']} at {callback['path']}")
        if callback["last_error"]:
            print(f"  last error {callback['last_error']}")
    if trace.get("github_calls"):
        print("GitHub calls:")
    for call in trace.get("github_calls", []):
        print(
            f"  {call['at']}  {call['task'].removeprefix('hookline.'):<22} "
            f"{call['method']:<5} {call['path']} -> {call['status']} ({call['ms']} ms)"
        )


def _require_database(database_url: str) -> None:
    """Refuse a SQLite file that does not exist: opening it would make an empty one."""
    url = make_url(database_url)
    path = url.database or ""
    on_disk = url.get_backend_name() == "sqlite" and path not in {"", ":memory:"}
    if on_disk and not Path(path).exists():
        raise CommandError(
            f"there is no database at {path}: set DATABASE_URL "
            "(the demo prints its own at the end)",
            USAGE,
        )


def _database_trouble(exc: SQLAlchemyError) -> str:
    text = str(exc)
    if "no such table" in text or "does not exist" in text:
        return (
            "the database has no Hookline tables yet: run `alembic upgrade head` "
            "(`make run` and the Procfile's release step do)"
        )
    return f"the database did not answer ({type(exc).__name__}); is DATABASE_URL right?"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hookline", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    # Also after the command (`hookline deliveries --json`), without undoing
    # a --json given before it.
    either = argparse.ArgumentParser(add_help=False)
    either.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    send = commands.add_parser(
        "send", parents=[either], help="sign a payload file and post it"
    )
    send.add_argument("file")
    send.add_argument("--event", required=True, help="the X-GitHub-Event to send")
    send.add_argument("--delivery", help="the X-GitHub-Delivery (default: new)")
    send.add_argument(
        "--url",
        default="http://127.0.0.1:5000",
        help="the gateway (default: %(default)s)",
    )

    deliveries = commands.add_parser(
        "deliveries", parents=[either], help="recent deliveries"
    )
    deliveries.add_argument("--limit", type=int, default=20)

    explain = commands.add_parser(
        "explain", parents=[either], help="the trace of one delivery"
    )
    explain.add_argument("delivery")

    conversations = commands.add_parser(
        "conversations", parents=[either], help="recent conversations"
    )
    conversations.add_argument("--limit", type=int, default=20)

    failed = commands.add_parser(
        "failed",
        parents=[either],
        help="GitHub writes that gave up (the dead letters), newest first",
    )
    failed.add_argument("--limit", type=int, default=20)

    retry = commands.add_parser(
        "retry", parents=[either], help="try a failed GitHub write again"
    )
    retry.add_argument("callback", type=int)

    replay = commands.add_parser(
        "replay",
        parents=[either],
        help="classify a stored delivery again, under a new id",
    )
    replay.add_argument("delivery")

    stop = commands.add_parser(
        "stop", parents=[either], help="stop an open conversation and say so"
    )
    stop.add_argument("conversation")
    stop.add_argument(
        "--reason", default="no reason given", help="recorded with the stop"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `hookline` command; return its exit code."""
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
        if args.command != "send":
            _require_database(settings.DATABASE_URL)
        result: Any = {
            "send": _send,
            "deliveries": _deliveries,
            "explain": _explain,
            "conversations": _conversations,
            "stop": _stop,
            "replay": _replay,
            "failed": _failed,
            "retry": _retry,
        }[args.command](args, settings)
    except CommandError as exc:
        print(f"hookline {args.command}: {exc}", file=sys.stderr)
        return exc.code
    except ConfigError as exc:
        print(f"hookline {args.command}: {exc}", file=sys.stderr)
        return USAGE
    except SQLAlchemyError as exc:
        print(f"hookline {args.command}: {_database_trouble(exc)}", file=sys.stderr)
        return UNAVAILABLE

    if args.json:
        print(json.dumps(result, indent=2, default=str))
    elif args.command == "explain":
        _print_trace(result)
    elif args.command == "deliveries":
        _print_table(result, ["at", "delivery", "event", "action", "verdict", "reason"])
    elif args.command == "failed":
        _print_table(
            result, ["at", "callback", "conversation", "turn", "event", "last_error"]
        )
    elif args.command == "retry":
        print(f"callback {result['callback']} is queued again")
    elif args.command == "replay":
        print(f"replaying {result['replay_of']} as {result['delivery']}")
    elif args.command == "stop":
        print(f"stopped conversation {result['conversation']}; the notice is queued")
    elif args.command == "conversations":
        _print_table(
            result,
            [
                "updated",
                "conversation",
                "delivery",
                "repository",
                "number",
                "turns",
                "status",
            ],
        )
    else:
        print(f"HTTP {result['status']}: {json.dumps(result['answer'])}")
        print(f"delivery {result['delivery']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
