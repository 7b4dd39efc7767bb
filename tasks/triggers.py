"""Decide, from a delivery alone, whether it asks the bot for a job.

Pure functions, no I/O: the permission check that needs GitHub happens in the task.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TypedDict

# A backtick fence's info string holds no backtick (CommonMark), else it is inline.
_FENCE = re.compile(r"^ {0,3}(`{3,}(?=[^`]*$)|~{3,})")
_QUOTE = re.compile(r"^ {0,3}>")
_BACKTICKS = re.compile(r"`+")
_REPOSITORY = re.compile(r"[A-Za-z0-9-]{1,39}/[A-Za-z0-9_.-]{1,100}")
_LOGIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,38}(?:\[bot\])?")
COMMENT_ACTIONS = {"edited": "edited comments", "deleted": "deleted comments"}


class Trigger(TypedDict):
    """What the conversation pool needs to start a job; JSON all the way down."""

    kind: str  # "issue", "pull_request" or "review_comment"
    repository: str
    number: int
    installation_id: int
    author: str
    request: str
    comment_id: int | None
    comment_node_id: str | None
    reaction_path: str
    reply_path: str
    path: str | None
    line: int | None
    diff_hunk: str | None
    head_ref: str | None
    head_repository: str | None  # where head_ref lives: a fork's, for a fork's PR
    thread_id: int | None  # the review thread's first comment, for inline triggers
    command: str | None  # "stop" when the comment is `@bot stop`, else None


@dataclass(frozen=True)
class Decision:
    """A trigger, or the reason why the delivery asks for nothing."""

    reason: str
    trigger: Trigger | None = None


def _strip_inline_code(text: str) -> str:
    """Remove inline code spans in one pass, however many backticks there are."""
    runs = [(match.start(), match.end()) for match in _BACKTICKS.finditer(text)]
    # A span closes at the next run of backticks of the same length (CommonMark).
    closer: list[int | None] = [None] * len(runs)
    last_of_length: dict[int, int] = {}
    for index in range(len(runs) - 1, -1, -1):
        length = runs[index][1] - runs[index][0]
        closer[index] = last_of_length.get(length)
        last_of_length[length] = index

    pieces: list[str] = []
    position = index = 0
    while index < len(runs):
        close = closer[index]
        if close is None:
            index += 1
            continue
        pieces.append(text[position : runs[index][0]])
        pieces.append(" ")
        position = runs[close][1]
        index = close + 1
    pieces.append(text[position:])
    return "".join(pieces)


def _strip_code_and_quotes(body: str) -> str:
    """Return `body` without quotes, code blocks and inline code."""
    kept: list[str] = []
    fence: str | None = None
    previous_blank = True
    in_quote = False
    for line in body.splitlines():
        opening = _FENCE.match(line)
        if fence is not None:
            closing = (
                opening
                and opening.group(1)[0] == fence[0]
                and len(opening.group(1)) >= len(fence)
                and not line[opening.end() :].strip()
            )
            if closing:
                fence = None
            continue
        if opening:
            fence = opening.group(1)
            continue
        blank = not line.strip()
        # A quote goes on over following lines until a blank one (lazy continuation).
        in_quote = bool(_QUOTE.match(line)) or (in_quote and not blank)
        indented = line.startswith(("    ", "\t")) and not blank
        if in_quote or (indented and previous_blank):
            # An indented block after a blank line is Markdown code; keep treating
            # the following indented lines as code by not resetting the flag.
            previous_blank = bool(indented) and previous_blank
            continue
        kept.append(line)
        previous_blank = blank
    return _strip_inline_code("\n".join(kept))


def mentions(body: str | None, handle: str) -> bool:
    """Tell whether `body` mentions `handle` as a whole word, outside quotes and code.

    `@openhands-dev`, `@openhands/team` and `me@openhands.dev` do not count;
    `@OpenHands,` does.
    """
    if not body:
        return False
    pattern = re.compile(
        r"(?<![\w@./-])" + re.escape(handle) + r"(?![\w/-])", re.IGNORECASE
    )
    return pattern.search(_strip_code_and_quotes(body)) is not None


def is_stop(body: str, handle: str) -> bool:
    """Tell whether a comment is the stop command: the mention, then `stop`, alone.

    `@openhands stop` and `@OpenHands, stop!` stop; `@openhands stop using
    globals` is a request like any other, and so is a quoted stop.
    """
    text = _strip_code_and_quotes(body).strip()
    pattern = re.escape(handle) + r"[\s,:]+stop[\s.!]*"
    return re.fullmatch(pattern, text, re.IGNORECASE) is not None


class MalformedPayload(ValueError):
    """A field the decision needs is missing or of the wrong type."""


def object_field(container: dict, key: str) -> dict:
    """Return `container[key]` if it is a JSON object, else MalformedPayload."""
    value = container.get(key)
    if not isinstance(value, dict):
        raise MalformedPayload(f"{key} is not an object")
    return value


def positive_int(container: dict, key: str) -> int:
    """Return `container[key]` if it is an id GitHub could send; else refuse it."""
    value = container.get(key)
    # bool is an int to Python, not to GitHub; ids are stored as 64-bit integers.
    if type(value) is not int or not 0 < value < 2**63:
        raise MalformedPayload(f"{key} is not a positive integer")
    return value


def text_field(container: dict, key: str) -> str:
    """Return `container[key]` as text ("" when null), else MalformedPayload."""
    value = container.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise MalformedPayload(f"{key} is not a string")
    return value


def _login(user: dict) -> str:
    login = user.get("login")
    if not isinstance(login, str) or not _LOGIN.fullmatch(login):
        raise MalformedPayload("login is not a GitHub login")
    return login


def repository_name(payload: dict) -> str:
    """Return the delivery's owner/name, refusing anything that could walk a path."""
    name = object_field(payload, "repository").get("full_name")
    # These names end up in API paths; refuse anything that could walk them.
    if not isinstance(name, str) or not _REPOSITORY.fullmatch(name):
        raise MalformedPayload("repository.full_name is not owner/name")
    if {".", ".."} & set(name.split("/")):
        raise MalformedPayload("repository.full_name is not owner/name")
    return name


def _branch(head: dict) -> str | None:
    ref = text_field(head, "ref")
    if len(ref) > 255 or "\x00" in ref:
        raise MalformedPayload("pull_request.head.ref is not a branch name")
    return ref or None


def _head_repository(head: dict) -> str | None:
    repo = head.get("repo")
    name = repo.get("full_name") if isinstance(repo, dict) else None
    return name if isinstance(name, str) and _REPOSITORY.fullmatch(name) else None


def _author_name(payload: dict, comment: dict) -> str:
    for user in (comment.get("user"), payload.get("sender")):
        login = user.get("login") if isinstance(user, dict) else None
        if isinstance(login, str) and _LOGIN.fullmatch(login):
            return login
    return "unknown"


def _written_by_bot(payload: dict, comment: dict) -> bool:
    sender = payload.get("sender") if isinstance(payload.get("sender"), dict) else {}
    author = comment.get("user") if isinstance(comment.get("user"), dict) else {}
    return sender.get("type") == "Bot" or author.get("type") == "Bot"


def classify(event: str, payload: dict, label: str, handle: str) -> Decision:
    """Return the trigger a delivery carries, or the reason it carries none."""
    if event in {"installation", "installation_repositories"}:
        return Decision(f"{event} event recorded, no job")
    if event not in {"issues", "issue_comment", "pull_request_review_comment"}:
        return Decision(f"{event} events do not trigger")
    try:
        return _classify(event, payload, label, handle)
    except MalformedPayload as exc:
        return Decision(f"malformed payload: {exc}")


def _classify(event: str, payload: dict, label: str, handle: str) -> Decision:
    action = payload.get("action")
    action = action if isinstance(action, str) else None
    installation = payload.get("installation")
    if not isinstance(installation, dict) or "id" not in installation:
        return Decision("no App installation in the delivery")
    installation_id = positive_int(installation, "id")
    repository = repository_name(payload)

    if event == "issues":
        if action != "labeled":
            return Decision(f"{action} issues do not trigger")
        applied = text_field(object_field(payload, "label"), "name")
        if applied.casefold() != label.casefold():
            return Decision(
                f"label {applied[:50]!r} is not the trigger label {label!r}"
            )
        return _issue_trigger(payload, repository, installation_id)

    if action != "created":
        return Decision(
            f"{COMMENT_ACTIONS.get(action or '', f'{action} comments')} do not trigger"
        )
    comment = object_field(payload, "comment")
    if _written_by_bot(payload, comment):
        return Decision(f"comment written by a bot ({_author_name(payload, comment)})")
    body = text_field(comment, "body")
    if not mentions(body, handle):
        if handle.casefold() in body.casefold():
            return Decision(f"{handle} appears only in a quote, code or longer word")
        return Decision(f"comment does not mention {handle}")

    command = "stop" if is_stop(body, handle) else None
    if event == "issue_comment":
        return _issue_comment_trigger(payload, repository, installation_id, command)
    return _review_comment_trigger(payload, repository, installation_id, command)


def _issue_trigger(payload: dict, repository: str, installation_id: int) -> Decision:
    issue = object_field(payload, "issue")
    number = positive_int(issue, "number")
    return Decision(
        "labeled issue",
        Trigger(
            kind="issue",
            repository=repository,
            number=number,
            installation_id=installation_id,
            author=_login(object_field(payload, "sender")),
            request=text_field(issue, "body").replace("\x00", ""),
            comment_id=None,
            comment_node_id=None,
            reaction_path=f"/repos/{repository}/issues/{number}/reactions",
            reply_path=f"/repos/{repository}/issues/{number}/comments",
            path=None,
            line=None,
            diff_hunk=None,
            head_ref=None,
            head_repository=None,
            thread_id=None,
            command=None,
        ),
    )


def _issue_comment_trigger(
    payload: dict, repository: str, installation_id: int, command: str | None
) -> Decision:
    issue, comment = object_field(payload, "issue"), object_field(payload, "comment")
    number = positive_int(issue, "number")
    comment_id = positive_int(comment, "id")
    on_pull_request = bool(issue.get("pull_request"))
    return Decision(
        "pull request comment" if on_pull_request else "issue comment",
        Trigger(
            kind="pull_request" if on_pull_request else "issue",
            repository=repository,
            number=number,
            installation_id=installation_id,
            author=_login(object_field(comment, "user")),
            request=text_field(comment, "body").replace("\x00", ""),
            comment_id=comment_id,
            comment_node_id=text_field(comment, "node_id") or None,
            reaction_path=(
                f"/repos/{repository}/issues/comments/{comment_id}/reactions"
            ),
            reply_path=f"/repos/{repository}/issues/{number}/comments",
            path=None,
            line=None,
            diff_hunk=None,
            head_ref=None,
            head_repository=None,
            thread_id=None,
            command=command,
        ),
    )


def _review_comment_trigger(
    payload: dict, repository: str, installation_id: int, command: str | None
) -> Decision:
    pull, comment = (
        object_field(payload, "pull_request"),
        object_field(payload, "comment"),
    )
    number = positive_int(pull, "number")
    comment_id = positive_int(comment, "id")
    # GitHub takes replies only to a thread's first comment.
    thread_id = (
        positive_int(comment, "in_reply_to_id")
        if comment.get("in_reply_to_id") is not None
        else comment_id
    )
    line = comment.get("line") or comment.get("original_line")
    head = pull.get("head") if isinstance(pull.get("head"), dict) else {}
    return Decision(
        "inline review comment",
        Trigger(
            kind="review_comment",
            repository=repository,
            number=number,
            installation_id=installation_id,
            author=_login(object_field(comment, "user")),
            request=text_field(comment, "body").replace("\x00", ""),
            comment_id=comment_id,
            comment_node_id=text_field(comment, "node_id") or None,
            reaction_path=f"/repos/{repository}/pulls/comments/{comment_id}/reactions",
            reply_path=(
                f"/repos/{repository}/pulls/{number}/comments/{thread_id}/replies"
            ),
            path=text_field(comment, "path") or None,
            line=line if type(line) is int else None,
            diff_hunk=text_field(comment, "diff_hunk") or None,
            head_ref=_branch(head),
            head_repository=_head_repository(head),
            thread_id=thread_id,
            command=command,
        ),
    )
