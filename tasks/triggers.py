"""Decide, from a delivery alone, whether it asks the bot for a job.

Pure functions, no I/O: the permission check that needs GitHub happens in the task.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TypedDict

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_QUOTE = re.compile(r"^ {0,3}>")
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
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


@dataclass(frozen=True)
class Decision:
    """A trigger, or the reason why the delivery asks for nothing."""

    reason: str
    trigger: Trigger | None = None


def _strip_code_and_quotes(body: str) -> str:
    """Return `body` without quoted lines, code blocks and inline code."""
    kept: list[str] = []
    fence: str | None = None
    previous_blank = True
    for line in body.splitlines():
        opening = _FENCE.match(line)
        if fence is not None:
            closing = opening and opening.group(1)[0] == fence[0]
            if closing and len(opening.group(1)) >= len(fence):
                fence = None
            continue
        if opening:
            fence = opening.group(1)
            continue
        indented = line.startswith(("    ", "\t")) and line.strip()
        if _QUOTE.match(line) or (indented and previous_blank):
            # An indented block after a blank line is Markdown code; keep treating
            # the following indented lines as code by not resetting the flag.
            previous_blank = bool(indented) and previous_blank
            continue
        kept.append(line)
        previous_blank = not line.strip()
    return _INLINE_CODE.sub(" ", "\n".join(kept))


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


def _installation_id(payload: dict) -> int | None:
    installation = payload.get("installation")
    if isinstance(installation, dict) and isinstance(installation.get("id"), int):
        return installation["id"]
    return None


def _written_by_bot(payload: dict) -> bool:
    sender = payload.get("sender") or {}
    author = (payload.get("comment") or {}).get("user") or {}
    return sender.get("type") == "Bot" or author.get("type") == "Bot"


def classify(event: str, payload: dict, label: str, handle: str) -> Decision:
    """Return the trigger a delivery carries, or the reason it carries none."""
    action = payload.get("action")
    if event == "installation" or event == "installation_repositories":
        return Decision(f"{event} event recorded, no job")
    if event not in {"issues", "issue_comment", "pull_request_review_comment"}:
        return Decision(f"{event} events do not trigger")

    installation_id = _installation_id(payload)
    if installation_id is None:
        return Decision("no App installation in the delivery")
    repository = (payload.get("repository") or {}).get("full_name")
    if not repository:
        return Decision("no repository in the delivery")

    if event == "issues":
        if action != "labeled":
            return Decision(f"{action} issues do not trigger")
        if (payload.get("label") or {}).get("name", "").casefold() != label.casefold():
            return Decision("label is not the trigger label")
        return _issue_trigger(payload, repository, installation_id)

    if action != "created":
        return Decision(
            f"{COMMENT_ACTIONS.get(action, f'{action} comments')} do not trigger"
        )
    if _written_by_bot(payload):
        return Decision("comment written by a bot")
    comment = payload.get("comment") or {}
    if not mentions(comment.get("body"), handle):
        if handle.casefold() in (comment.get("body") or "").casefold():
            return Decision(f"{handle} appears only in a quote, code or longer word")
        return Decision(f"comment does not mention {handle}")

    if event == "issue_comment":
        return _issue_comment_trigger(payload, repository, installation_id)
    return _review_comment_trigger(payload, repository, installation_id)


def _issue_trigger(payload: dict, repository: str, installation_id: int) -> Decision:
    issue = payload["issue"]
    number = issue["number"]
    return Decision(
        "labeled issue",
        Trigger(
            kind="issue",
            repository=repository,
            number=number,
            installation_id=installation_id,
            author=(payload.get("sender") or {}).get("login", ""),
            request=issue.get("body") or "",
            comment_id=None,
            comment_node_id=None,
            reaction_path=f"/repos/{repository}/issues/{number}/reactions",
            reply_path=f"/repos/{repository}/issues/{number}/comments",
            path=None,
            line=None,
            diff_hunk=None,
            head_ref=None,
        ),
    )


def _issue_comment_trigger(
    payload: dict, repository: str, installation_id: int
) -> Decision:
    issue, comment = payload["issue"], payload["comment"]
    number = issue["number"]
    on_pull_request = bool(issue.get("pull_request"))
    return Decision(
        "pull request comment" if on_pull_request else "issue comment",
        Trigger(
            kind="pull_request" if on_pull_request else "issue",
            repository=repository,
            number=number,
            installation_id=installation_id,
            author=comment["user"]["login"],
            request=comment["body"],
            comment_id=comment["id"],
            comment_node_id=comment.get("node_id"),
            reaction_path=f"/repos/{repository}/issues/comments/{comment['id']}/reactions",
            reply_path=f"/repos/{repository}/issues/{number}/comments",
            path=None,
            line=None,
            diff_hunk=None,
            head_ref=None,
        ),
    )


def _review_comment_trigger(
    payload: dict, repository: str, installation_id: int
) -> Decision:
    pull, comment = payload["pull_request"], payload["comment"]
    number = pull["number"]
    # GitHub takes replies only to a thread's first comment.
    thread_id = comment.get("in_reply_to_id") or comment["id"]
    return Decision(
        "inline review comment",
        Trigger(
            kind="review_comment",
            repository=repository,
            number=number,
            installation_id=installation_id,
            author=comment["user"]["login"],
            request=comment["body"],
            comment_id=comment["id"],
            comment_node_id=comment.get("node_id"),
            reaction_path=f"/repos/{repository}/pulls/comments/{comment['id']}/reactions",
            reply_path=f"/repos/{repository}/pulls/{number}/comments/{thread_id}/replies",
            path=comment.get("path"),
            line=comment.get("line") or comment.get("original_line"),
            diff_hunk=comment.get("diff_hunk"),
            head_ref=(pull.get("head") or {}).get("ref"),
        ),
    )
