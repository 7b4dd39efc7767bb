"""Comments Hookline writes on GitHub, each written at most once.

Every comment carries a hidden mark naming what it is for. A task that may have
posted before it died looks for its mark before posting again, so a retry or a
broker redelivery finds the first comment instead of adding a second.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from hookline.github import GitHubClient


def status_mark(conversation_id: uuid.UUID, turn: int) -> str:
    """Return the mark of a turn's "working on it" comment."""
    return f"hookline:status={conversation_id}/{turn}"


def callback_mark(conversation_id: uuid.UUID, turn: int, event: str) -> str:
    """Return the mark of the comment one callback posts."""
    return f"hookline:callback={conversation_id}/{turn}/{event}"


def _token(mark: str) -> str:
    return f"<!-- {mark} -->"


def with_mark(text: str, *marks: str) -> str:
    """Append hidden marks to a comment's text.

    Appended here, not in the templates, so an operator's template cannot drop
    what makes a repeated post detectable.
    """
    hidden = "".join(f"\n\n{_token(mark)}" for mark in marks)
    return f"{text}{hidden}"


def written_by_app(comment: dict, app_id: str) -> bool:
    """Tell whether GitHub says this App wrote the comment.

    Anyone can paste a mark into a comment of their own; only the App's own
    comments carry `performed_via_github_app` with its id.
    """
    app = comment.get("performed_via_github_app")
    return isinstance(app, dict) and str(app.get("id")) == str(app_id)


def find_marked(
    client: GitHubClient,
    kind: str,
    repository: str,
    number: int,
    mark: str,
    since: datetime,
    app_id: str,
) -> dict | None:
    """Return this App's comment carrying `mark`, written on or after `since`."""
    # A minute of slack for clocks; GitHub filters on the comment's update time.
    after = (since - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    if kind == "review_comment":
        comments = client.review_comments(repository, number, after)
    else:
        comments = client.issue_comments(repository, number, since=after)
    token = _token(mark)
    return next(
        (
            c
            for c in comments
            if written_by_app(c, app_id) and token in (c.get("body") or "").splitlines()
        ),
        None,
    )
