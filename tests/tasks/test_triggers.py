"""Pin which deliveries ask the bot for a job, and where it will answer."""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path

import pytest

from tasks.triggers import classify, mentions

DELIVERIES = Path(__file__).resolve().parents[2] / "examples" / "deliveries"
INDEX = json.loads((DELIVERIES / "INDEX.json").read_text())
LABEL = "openhands"
HANDLE = "@openhands"


@cache
def _recorded(name: str) -> dict:
    return json.loads((DELIVERIES / name).read_text())


def delivery(name: str) -> dict:
    """Return a private copy of a recorded payload, safe to edit."""
    return copy.deepcopy(_recorded(name))


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param("@openhands fix it", True, id="leading"),
        pytest.param("please @openhands fix the parser", True, id="mid-sentence"),
        pytest.param("@OpenHands fix it", True, id="mixed-case"),
        pytest.param("@OPENHANDS fix it", True, id="upper-case"),
        pytest.param("@openhands", True, id="alone"),
        pytest.param("@openhands-dev fix it", False, id="hyphen-longer-handle"),
        pytest.param("@openhands_x fix it", False, id="underscore-longer-word"),
        pytest.param("@openhands/team fix it", False, id="team-mention"),
        pytest.param("mail me@openhands.dev", False, id="email-address"),
        pytest.param("thanks @openhands, fix it", True, id="trailing-comma"),
        pytest.param("over to you @openhands.", True, id="trailing-period"),
        pytest.param("ask the bot (@openhands)", True, id="parenthesised"),
        pytest.param("@openhands? can you", True, id="trailing-question-mark"),
        pytest.param("> @openhands fix it", False, id="quoted"),
        pytest.param("  > @openhands fix it", False, id="quoted-indented"),
        pytest.param("```\n@openhands fix it\n```", False, id="backtick-fence"),
        pytest.param("~~~\n@openhands fix it\n~~~", False, id="tilde-fence"),
        pytest.param("```py\n@openhands\n```", False, id="fence-with-info"),
        pytest.param(
            "~~~\n```\n@openhands\n~~~", False, id="backticks-do-not-close-tildes"
        ),
        pytest.param("````\n```\n@openhands\n````", False, id="short-fence-no-close"),
        pytest.param("```\nunclosed\n@openhands", False, id="unclosed-fence"),
        pytest.param("see `@openhands` in the docs", False, id="inline-code"),
        pytest.param("see ``a ` @openhands`` here", False, id="double-backtick-code"),
        pytest.param(
            "Run this:\n\n    @openhands in code\n", False, id="indented-code-block"
        ),
        pytest.param("\t@openhands in code", False, id="tab-indented-code"),
        pytest.param(
            "Run:\n\n    line one\n    @openhands two\n",
            False,
            id="indented-code-second-line",
        ),
        pytest.param(
            "a paragraph\n    @openhands continues it",
            True,
            id="indented-paragraph-continuation",
        ),
        pytest.param(
            "```\ncode\n```\n@openhands fix it", True, id="after-fence-closes"
        ),
        pytest.param(
            "~~~\ncode\n~~~\n\n@openhands fix it", True, id="after-tilde-fence"
        ),
        pytest.param("    code\n\n@openhands fix it", True, id="after-indented-code"),
        pytest.param(
            "> @openhands said\n\n@openhands please do", True, id="after-quote"
        ),
        pytest.param("`code` then @openhands", True, id="after-inline-code"),
        pytest.param("", False, id="empty"),
        pytest.param(None, False, id="none"),
    ],
)
def test_mentions(body: str | None, expected: bool) -> None:
    assert mentions(body, HANDLE) is expected


def test_custom_handle_is_mentioned() -> None:
    assert mentions("thanks @Hookline-Bot, go", "@hookline-bot")


def test_custom_handle_ignores_the_default_handle() -> None:
    assert not mentions("@openhands fix it", "@hookline-bot")


def test_custom_handle_ignores_a_longer_handle() -> None:
    assert not mentions("@hookline-bot-2 fix it", "@hookline-bot")


def test_handle_is_matched_literally_not_as_a_pattern() -> None:
    assert not mentions("@aXb fix it", "@a.b")


@pytest.mark.parametrize(
    "entry", INDEX, ids=[entry["file"].removesuffix(".json") for entry in INDEX]
)
def test_recorded_delivery_job_or_ignored_matches_index(entry: dict) -> None:
    decision = classify(entry["event"], delivery(entry["file"]), LABEL, HANDLE)

    wants_job = entry["expect"].startswith("job:")
    assert (decision.trigger is not None) is wants_job, decision.reason
    assert decision.reason


def test_ping_is_ignored() -> None:
    decision = classify("ping", delivery("ping.json"), LABEL, HANDLE)

    assert decision.trigger is None
    assert "ping" in decision.reason


HELLO = "/repos/octo-user/Hello-World"
ATLANTIS = "/repos/octo-user/atlantis-tests"


@pytest.mark.parametrize(
    ("name", "event", "expected"),
    [
        pytest.param(
            "issues.labeled.json",
            "issues",
            {
                "kind": "issue",
                "repository": "octo-user/Hello-World",
                "number": 1,
                "author": "octo-user",
                "comment_id": None,
                "reaction_path": f"{HELLO}/issues/1/reactions",
                "reply_path": f"{HELLO}/issues/1/comments",
            },
            id="labeled-issue",
        ),
        pytest.param(
            "issue_comment.created.json",
            "issue_comment",
            {
                "kind": "issue",
                "repository": "octo-user/Hello-World",
                "number": 1,
                "author": "octo-user",
                "comment_id": 492700400,
                "reaction_path": f"{HELLO}/issues/comments/492700400/reactions",
                "reply_path": f"{HELLO}/issues/1/comments",
            },
            id="issue-comment",
        ),
        pytest.param(
            "issue_comment.created.pull_request.json",
            "issue_comment",
            {
                "kind": "pull_request",
                "repository": "octo-user/atlantis-tests",
                "number": 1,
                "author": "octo-user",
                "comment_id": 396926483,
                "reaction_path": f"{ATLANTIS}/issues/comments/396926483/reactions",
                "reply_path": f"{ATLANTIS}/issues/1/comments",
            },
            id="pull-request-comment",
        ),
        pytest.param(
            "pull_request_review_comment.created.json",
            "pull_request_review_comment",
            {
                "kind": "review_comment",
                "repository": "octo-user/Hello-World",
                "number": 2,
                "author": "octo-user",
                "comment_id": 284312630,
                "reaction_path": f"{HELLO}/pulls/comments/284312630/reactions",
                "reply_path": f"{HELLO}/pulls/2/comments/284312630/replies",
            },
            id="review-comment",
        ),
    ],
)
def test_job_trigger_fields(name: str, event: str, expected: dict) -> None:
    trigger = classify(event, delivery(name), LABEL, HANDLE).trigger

    assert trigger is not None
    assert {key: trigger[key] for key in expected} == expected
    assert trigger["installation_id"] == 4001


def test_issue_comment_request_is_the_comment_body() -> None:
    trigger = classify(
        "issue_comment", delivery("issue_comment.created.json"), LABEL, HANDLE
    ).trigger

    assert trigger is not None
    assert trigger["request"] == (
        "@openhands the parser drops the last line of the file, can you fix it?"
    )


def test_review_comment_trigger_carries_file_line_and_branch() -> None:
    trigger = classify(
        "pull_request_review_comment",
        delivery("pull_request_review_comment.created.json"),
        LABEL,
        HANDLE,
    ).trigger

    assert trigger is not None
    assert trigger["path"] == "README.md"
    assert trigger["line"] == 265
    assert trigger["head_ref"] == "changes"
    assert trigger["diff_hunk"]


def test_review_reply_answers_the_threads_first_comment() -> None:
    payload = delivery("pull_request_review_comment.created.json")
    payload["comment"]["in_reply_to_id"] = 284300000

    trigger = classify("pull_request_review_comment", payload, LABEL, HANDLE).trigger

    assert trigger is not None
    assert trigger["reply_path"] == f"{HELLO}/pulls/2/comments/284300000/replies"
    assert trigger["reaction_path"] == f"{HELLO}/pulls/comments/284312630/reactions"


def test_outdated_review_comment_falls_back_to_original_line() -> None:
    payload = delivery("pull_request_review_comment.created.json")
    payload["comment"]["line"] = None
    payload["comment"]["original_line"] = 12

    trigger = classify("pull_request_review_comment", payload, LABEL, HANDLE).trigger

    assert trigger is not None
    assert trigger["line"] == 12


@pytest.mark.parametrize("label", ["OpenHands", "OPENHANDS"])
def test_trigger_label_match_ignores_case(label: str) -> None:
    decision = classify("issues", delivery("issues.labeled.json"), label, HANDLE)

    assert decision.trigger is not None


def test_labeled_issue_with_another_label_is_ignored() -> None:
    decision = classify(
        "issues", delivery("issues.labeled.other-label.json"), LABEL, HANDLE
    )

    assert decision.trigger is None
    assert decision.reason == "label 'bug' is not the trigger label 'openhands'"


def test_delivery_without_installation_is_ignored_with_reason() -> None:
    payload = delivery("issue_comment.created.json")
    del payload["installation"]

    decision = classify("issue_comment", payload, LABEL, HANDLE)

    assert decision.trigger is None
    assert "installation" in decision.reason


def test_comment_by_a_bot_is_ignored_even_when_sender_is_a_user() -> None:
    payload = delivery("issue_comment.created.json")
    payload["comment"]["user"]["type"] = "Bot"
    assert payload["sender"]["type"] == "User"

    decision = classify("issue_comment", payload, LABEL, HANDLE)

    assert decision.trigger is None
    assert "bot" in decision.reason


def test_comment_sent_by_a_bot_is_ignored() -> None:
    payload = delivery("issue_comment.created.json")
    payload["sender"]["type"] = "Bot"

    decision = classify("issue_comment", payload, LABEL, HANDLE)

    assert decision.trigger is None
    assert "bot" in decision.reason


def test_custom_handle_triggers_and_default_handle_does_not() -> None:
    payload = delivery("issue_comment.created.json")
    payload["comment"]["body"] = "@hookline-bot fix it"

    assert classify("issue_comment", payload, LABEL, "@hookline-bot").trigger
    assert classify("issue_comment", payload, LABEL, HANDLE).trigger is None


def test_a_bots_comment_is_ignored_naming_the_bot() -> None:
    decision = classify(
        "issue_comment",
        delivery("issue_comment.created.bot-author.json"),
        LABEL,
        HANDLE,
    )

    assert decision.trigger is None
    assert decision.reason == "comment written by a bot (openhands[bot])"


def test_a_nul_in_a_comment_is_dropped_from_the_request() -> None:
    payload = delivery("issue_comment.created.json")
    payload["comment"]["body"] = "@openhands fix\x00 it"

    decision = classify("issue_comment", payload, LABEL, HANDLE)

    assert decision.trigger is not None
    assert decision.trigger["request"] == "@openhands fix it"


def test_a_head_branch_longer_than_git_allows_is_malformed() -> None:
    payload = delivery("pull_request_review_comment.created.json")
    payload["pull_request"]["head"]["ref"] = "b" * 300

    decision = classify("pull_request_review_comment", payload, LABEL, HANDLE)

    assert decision.trigger is None
    assert (
        decision.reason
        == "malformed payload: pull_request.head.ref is not a branch name"
    )
