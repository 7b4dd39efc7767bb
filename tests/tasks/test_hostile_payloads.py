"""Payloads that pass the gateway but are not what GitHub sends: never a crash."""

from __future__ import annotations

import copy
import json

import pytest

from tasks.triggers import classify, mentions
from tests.conftest import FIXTURES

COMMENT = json.loads((FIXTURES / "issue_comment.created.json").read_text())
REVIEW = json.loads((FIXTURES / "pull_request_review_comment.created.json").read_text())
LABELED = json.loads((FIXTURES / "issues.labeled.json").read_text())


def altered(payload: dict, path: str, value: object) -> dict:
    """Return a copy of `payload` with the dotted `path` set (or removed for ...)."""
    result = copy.deepcopy(payload)
    *parents, last = path.split(".")
    target = result
    for name in parents:
        target = target[name]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return result


CASES = [
    ("issue_comment", COMMENT, "issue", ...),
    ("issue_comment", COMMENT, "issue", None),
    ("issue_comment", COMMENT, "comment", None),
    ("issue_comment", COMMENT, "comment", "a string"),
    ("issue_comment", COMMENT, "comment.body", 42),
    ("issue_comment", COMMENT, "comment.body", ["@openhands"]),
    ("issue_comment", COMMENT, "comment.user", ...),
    ("issue_comment", COMMENT, "comment.user", None),
    ("issue_comment", COMMENT, "comment.user.login", "../../admin"),
    ("issue_comment", COMMENT, "comment.id", "492700400"),
    ("issue_comment", COMMENT, "comment.id", True),
    ("issue_comment", COMMENT, "comment.id", 2**64),
    ("issue_comment", COMMENT, "issue.number", "1"),
    ("issue_comment", COMMENT, "issue.number", -1),
    ("issue_comment", COMMENT, "installation.id", "4001"),
    ("issue_comment", COMMENT, "installation", []),
    ("issue_comment", COMMENT, "repository", ...),
    ("issue_comment", COMMENT, "repository.full_name", "o/r/../../x"),
    ("issue_comment", COMMENT, "repository.full_name", "octo-user/.."),
    ("issue_comment", COMMENT, "sender", "Bot"),
    ("issue_comment", COMMENT, "action", ["created"]),
    ("issue_comment", COMMENT, "action", {"created": 1}),
    ("issues", LABELED, "label", None),
    ("issues", LABELED, "label.name", 7),
    ("issues", LABELED, "sender", ...),
    ("issues", LABELED, "issue.body", {"text": "x"}),
    ("pull_request_review_comment", REVIEW, "pull_request", ...),
    ("pull_request_review_comment", REVIEW, "pull_request.head", "main"),
    ("pull_request_review_comment", REVIEW, "comment.in_reply_to_id", "12"),
    ("pull_request_review_comment", REVIEW, "comment.line", "265"),
]


@pytest.mark.parametrize(
    ("event", "payload", "path", "value"),
    CASES,
    ids=[f"{event}:{path}={value!r}"[:60] for event, _, path, value in CASES],
)
def test_mistyped_field_gives_a_decision_not_an_exception(
    event: str, payload: dict, path: str, value: object
) -> None:
    decision = classify(event, altered(payload, path, value), "openhands", "@openhands")

    assert isinstance(decision.reason, str)
    if decision.trigger is not None:
        # Whatever got through must be safe to put in an API path.
        assert ".." not in decision.trigger["reply_path"]
        assert type(decision.trigger["number"]) is int
        assert type(decision.trigger["installation_id"]) is int


def test_path_walking_repository_name_is_refused() -> None:
    payload = altered(COMMENT, "repository.full_name", "o/r/../../x")

    decision = classify("issue_comment", payload, "openhands", "@openhands")

    assert decision.trigger is None
    assert (
        decision.reason == "malformed payload: repository.full_name is not owner/name"
    )


def test_comment_of_many_backticks_is_classified() -> None:
    # A backtracking pattern took 7 s for 1,000 backticks and grew with the cube;
    # this must finish at all (GitHub allows 65,536 characters).
    payload = altered(COMMENT, "comment.body", "hi " + "`" * 65_000)

    decision = classify("issue_comment", payload, "openhands", "@openhands")

    assert decision.reason == "comment does not mention @openhands"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("`` a ` b `` @openhands", True),
        ("`a` @openhands `b`", True),
        ("`` @openhands ``", False),
        ("``` x ` @openhands", True),  # never closed: literal backticks
        ("> quoted\nstill the quote @openhands", False),
        ("> quoted\n\n@openhands after it", True),
    ],
)
def test_inline_code_and_lazy_quotes(body: str, expected: bool) -> None:
    assert mentions(body, "@openhands") is expected
