"""End to end: signed recorded deliveries through gunicorn, the pools and back.

Each test asserts on what reached the loopback fake GitHub (paths, bodies, counts)
and on the rows the pools stored in PostgreSQL.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
from sqlalchemy import select

from hookline.db import session_scope
from hookline.devtools import send_delivery
from hookline.models import Callback, Conversation, ConversationTransition, Delivery
from tests.conftest import FIXTURES, SECRET, Stack, fixture_bytes

INDEX = json.loads((FIXTURES / "INDEX.json").read_text())
TIMEOUT = 30


def verdict_of(stack: Stack, delivery_id: str, timeout: float = TIMEOUT) -> Delivery:
    """Wait for the classification pool's verdict on a delivery."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope(stack.settings.DATABASE_URL) as session:
            row = session.scalars(
                select(Delivery).where(Delivery.delivery_id == delivery_id)
            ).one_or_none()
        # The gateway stores it as `received`; the classifier gives the verdict.
        if row is not None and row.verdict != "received":
            return row
        time.sleep(0.1)
    raise AssertionError(f"no verdict for {delivery_id} within {timeout} s")


def callback_of(stack: Stack, delivery_id: str, done: bool = True) -> Callback:
    """Wait for a delivery's callback to be posted or failed."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        with session_scope(stack.settings.DATABASE_URL) as session:
            row = session.scalars(
                select(Callback)
                .join(Conversation)
                .where(Conversation.delivery_id == delivery_id)
            ).one_or_none()
        if row is not None and (not done or row.status != "pending"):
            return row
        time.sleep(0.1)
    raise AssertionError(f"no finished callback for {delivery_id}")


def conversation_of(stack: Stack, delivery_id: str) -> Conversation:
    with session_scope(stack.settings.DATABASE_URL) as session:
        return session.scalars(
            select(Conversation).where(Conversation.delivery_id == delivery_id)
        ).one()


@pytest.mark.parametrize("entry", INDEX, ids=[entry["file"] for entry in INDEX])
def test_recorded_delivery_gets_its_indexed_outcome(
    running: Stack, entry: dict
) -> None:
    delivery_id, status = running.send(entry["file"], entry["event"])

    if entry["event"] == "ping":
        assert status == 200
        time.sleep(0.5)
        assert running.fake.requests() == []
        return

    assert status == 202
    verdict = verdict_of(running, delivery_id)
    expected = entry["expect"].split(":")[0]
    assert verdict.verdict == expected, verdict.reason
    if expected == "ignored":
        time.sleep(0.3)
        assert running.fake.reactions() == []
        assert running.fake.comments() == []
        return

    callback = callback_of(running, delivery_id)
    conversation = conversation_of(running, delivery_id)
    assert callback.status == "posted"
    assert [r["path"] for r in running.fake.reactions()] == [
        conversation.reaction_path
    ] * 2
    assert [r["content"] for r in running.fake.reactions()] == ["eyes", "rocket"]
    comments = running.fake.comments()
    assert len(comments) == 1
    assert comments[0]["path"] == conversation.reply_path
    assert comments[0]["id"] == callback.github_comment_id
    assert f"test agent finished {conversation.repository}#" in comments[0]["body"]
    assert "secret_visible=False" in comments[0]["body"]


def test_labeled_issue_is_answered_on_the_issue(running: Stack) -> None:
    delivery_id, _ = running.send("issues.labeled.json", "issues")

    callback_of(running, delivery_id)
    conversation = conversation_of(running, delivery_id)
    assert conversation.kind == "issue"
    assert conversation.repository == "octo-user/Hello-World"
    assert conversation.number == 1
    assert conversation.installation_id == 4001
    assert conversation.trigger_comment_id is None
    assert conversation.status == "finished"
    (comment,) = running.fake.comments()
    assert comment["path"] == "/repos/octo-user/Hello-World/issues/1/comments"
    assert comment["kind"] == "issue"
    assert [r["path"] for r in running.fake.reactions()] == [
        "/repos/octo-user/Hello-World/issues/1/reactions"
    ] * 2
    with session_scope(running.settings.DATABASE_URL) as session:
        transitions = session.scalars(
            select(ConversationTransition)
            .where(ConversationTransition.conversation_id == conversation.id)
            .order_by(ConversationTransition.id)
        ).all()
    assert [(t.from_status, t.to_status) for t in transitions] == [
        (None, "queued"),
        ("queued", "running"),
        ("running", "finished"),
    ]
    assert transitions[0].cause == "issue trigger by octo-user"


def test_inline_review_comment_is_answered_in_its_thread(running: Stack) -> None:
    delivery_id, _ = running.send(
        "pull_request_review_comment.created.json", "pull_request_review_comment"
    )

    callback_of(running, delivery_id)
    (comment,) = running.fake.comments()
    assert comment["kind"] == "review_reply"
    assert comment["path"] == (
        "/repos/octo-user/Hello-World/pulls/2/comments/284312630/replies"
    )
    assert comment["in_reply_to"] == 284312630
    assert "file=README.md line=265" in comment["body"]
    assert "branch=changes" in comment["body"]
    conversation = conversation_of(running, delivery_id)
    assert conversation.trigger_node_id == (
        "MDI0OlB1bGxSZXF1ZXN0UmV2aWV3Q29tbWVudDI4NDMxMjYzMA=="
    )
    assert (conversation.file_path, conversation.line) == ("README.md", 265)


def test_pull_request_comment_fetches_the_head_branch(running: Stack) -> None:
    running.fake.add_issue(
        "octo-user/atlantis-tests",
        1,
        "Add a parser",
        "Body of the PR",
        pull_request=True,
        head_ref="parser-fix",
    )
    delivery_id, _ = running.send(
        "issue_comment.created.pull_request.json", "issue_comment"
    )

    callback_of(running, delivery_id)
    assert running.fake.requests("GET", "/pulls/1")
    conversation = conversation_of(running, delivery_id)
    assert conversation.branch == "parser-fix"
    assert "Add a parser" in conversation.instructions
    assert "branch=parser-fix" in running.fake.comments()[0]["body"]


def test_replayed_delivery_posts_once(running: Stack) -> None:
    delivery_id, first = running.send("issue_comment.created.json", "issue_comment")
    _, again = running.send("issue_comment.created.json", "issue_comment", delivery_id)

    callback_of(running, delivery_id)
    time.sleep(1)
    assert (first, again) == (202, 200)
    assert len(running.fake.comments()) == 1
    assert [r["content"] for r in running.fake.reactions()] == ["eyes", "rocket"]


def test_same_body_under_a_new_delivery_id_is_dropped(running: Stack) -> None:
    delivery_id, first = running.send("issue_comment.created.json", "issue_comment")
    _, copy = running.send("issue_comment.created.json", "issue_comment")

    callback_of(running, delivery_id)
    time.sleep(1)
    assert (first, copy) == (202, 200)
    assert len(running.fake.comments()) == 1


def test_forged_delivery_is_refused_and_queues_nothing(running: Stack) -> None:
    body = fixture_bytes("issue_comment.created.json")
    delivery_id = str(uuid.uuid4())
    response = send_delivery(
        running.gateway_url, "wrong-secret", "issue_comment", body, delivery_id
    )

    assert response.status_code == 403
    assert response.json()["reason"] == "bad_signature"
    # The real secret still works for that id: a forged copy claimed nothing.
    genuine = send_delivery(
        running.gateway_url, SECRET, "issue_comment", body, delivery_id
    )
    assert genuine.status_code == 202
    callback_of(running, delivery_id)
    assert len(running.fake.comments()) == 1


def test_author_without_write_access_gets_no_job(running: Stack) -> None:
    running.fake.set_permission("octo-user/Hello-World", "octo-user", "read")
    delivery_id, _ = running.send("issue_comment.created.json", "issue_comment")

    verdict = verdict_of(running, delivery_id)
    assert verdict.verdict == "ignored"
    assert verdict.reason == "octo-user has read permission, not write"
    time.sleep(0.5)
    assert running.fake.reactions() == []
    assert running.fake.comments() == []


def test_working_comment_retried_through_5xx_is_posted_once(running: Stack) -> None:
    running.fake.fail_next("POST", r"/issues/1/comments$", 502, times=2)
    delivery_id, _ = running.send("issue_comment.created.json", "issue_comment")

    callback = callback_of(running, delivery_id)
    assert callback.status == "posted"
    assert len(running.fake.requests("POST", "/issues/1/comments")) == 3
    (comment,) = running.fake.comments()
    # The "working on it" comment was posted once, then became the result.
    assert comment["edits"] == 1
    assert "test agent finished" in comment["body"]


def test_result_edit_retried_through_5xx_is_applied_once(running: Stack) -> None:
    running.fake.fail_next("PATCH", r"/issues/comments/\d+$", 502, times=2)
    delivery_id, _ = running.send("issue_comment.created.json", "issue_comment")

    callback = callback_of(running, delivery_id)
    assert callback.status == "posted"
    assert callback.attempts == 3
    assert len(running.fake.requests("PATCH", "/issues/comments/")) == 3
    (comment,) = running.fake.comments()
    assert comment["edits"] == 1


def test_comment_waits_for_retry_after_on_429(running: Stack) -> None:
    running.fake.fail_next("POST", r"/issues/1/comments$", 429, retry_after=2)
    delivery_id, _ = running.send("issue_comment.created.json", "issue_comment")

    callback_of(running, delivery_id)
    posts = running.fake.requests("POST", "/issues/1/comments")
    assert [p.status for p in posts] == [429, 201]
    assert posts[1].received_at - posts[0].received_at >= 2.0
    assert len(running.fake.comments()) == 1


def test_timed_out_reaction_is_retried_once_more(running: Stack) -> None:
    # The workers' GitHub timeout is 2 s; the fake answers the first call after 3 s.
    running.fake.fail_next("POST", r"/reactions$", 0, delay=3)
    delivery_id, _ = running.send("issue_comment.created.json", "issue_comment")

    callback_of(running, delivery_id)
    # The slow first call is recorded when the fake finally answers it: eyes
    # twice (the slow one and its retry), then rocket.
    assert running.fake.wait_for(
        lambda fake: len(fake.requests("POST", "/reactions")) == 3, timeout=5
    )
    assert [r["content"] for r in running.fake.reactions()] == ["eyes", "rocket"]
    assert len(running.fake.comments()) == 1


def test_result_refused_with_4xx_is_recorded_not_retried(running: Stack) -> None:
    running.fake.fail_next("PATCH", r"/issues/comments/\d+$", 404)
    delivery_id, _ = running.send("issue_comment.created.json", "issue_comment")

    callback = callback_of(running, delivery_id)
    time.sleep(1)
    assert callback.status == "failed"
    assert callback.attempts == 1
    assert "answered 404" in callback.last_error
    assert len(running.fake.requests("PATCH", "/issues/comments/")) == 1
    (comment,) = running.fake.comments()
    assert "edits" not in comment
    # Only this delivery's lines: the stack's logs hold every earlier test's too.
    failed = [
        r
        for r in running.log_records()
        if r["message"] == "callback.failed" and r.get("delivery") == delivery_id
    ]
    assert len(failed) == 1
    assert failed[0]["status"] == 404


def test_result_is_a_new_comment_when_the_working_one_was_refused(
    running: Stack,
) -> None:
    running.fake.fail_next("POST", r"/issues/1/comments$", 403)
    delivery_id, _ = running.send("issue_comment.created.json", "issue_comment")

    callback = callback_of(running, delivery_id)
    assert callback.status == "posted"
    posts = running.fake.requests("POST", "/issues/1/comments")
    assert [p.status for p in posts] == [403, 201]
    (comment,) = running.fake.comments()
    assert "test agent finished" in comment["body"]
    assert "edits" not in comment


def test_failing_agent_posts_a_notice_without_its_stderr(running: Stack) -> None:
    running.fake.add_issue("octo-user/Hello-World", 1, "Broken", "fail please")
    delivery_id, _ = running.send("issues.labeled.json", "issues")

    callback = callback_of(running, delivery_id)
    assert callback.event == "error"
    (comment,) = running.fake.comments()
    assert "could not finish this request: agent exited with code 4" in comment["body"]
    assert "Traceback" not in comment["body"]
    assert conversation_of(running, delivery_id).status == "error"
    assert [r["content"] for r in running.fake.reactions()] == ["eyes", "confused"]


def test_every_log_line_about_a_delivery_names_it(running: Stack) -> None:
    delivery_id, _ = running.send("issue_comment.created.json", "issue_comment")

    callback_of(running, delivery_id)
    time.sleep(0.5)
    mentioning = [r for r in running.log_records() if delivery_id in json.dumps(r)]

    assert all(r.get("delivery") == delivery_id for r in mentioning)
    assert {
        "delivery.accepted",
        "delivery.job",
        "conversation.started",
        "agent.finished",
        "callback.posted",
    } <= {r["message"] for r in mentioning}
    assert all(r["task"] for r in mentioning if r["logger"].startswith("tasks."))
    # The event and installation travel with the delivery from pool to pool.
    assert all(
        (r["event"], r["installation"]) == ("issue_comment", "4001")
        for r in mentioning
        if r["logger"].startswith("tasks.")
    )
    assert all(
        r["event"] == "issue_comment"
        for r in mentioning
        if r["logger"] == "webhook_gateway.app"
    )


def test_hostile_deliveries_get_a_verdict_and_the_pools_keep_working(
    running: Stack,
) -> None:
    walking = json.dumps(
        {
            "action": "created",
            "installation": {"id": 4001},
            "repository": {"full_name": "octo-user/../../admin"},
            "issue": {"number": 1},
            "comment": {"id": 1, "body": "@openhands", "user": {"login": "x"}},
        }
    ).encode()
    depth = 900
    deep = b'{"action": "created", "x": ' + b"[" * depth + b"]" * depth + b"}"
    walking_id, deep_id = str(uuid.uuid4()), str(uuid.uuid4())

    for delivery_id, body in ((walking_id, walking), (deep_id, deep)):
        response = send_delivery(
            running.gateway_url, SECRET, "issue_comment", body, delivery_id
        )
        assert response.status_code == 202
    normal_id, _ = running.send("issue_comment.created.json", "issue_comment")

    assert verdict_of(running, walking_id).reason == (
        "malformed payload: repository.full_name is not owner/name"
    )
    assert verdict_of(running, deep_id).verdict in {"ignored", "failed"}
    assert callback_of(running, normal_id).status == "posted"
    assert len(running.fake.comments()) == 1


def test_inline_trigger_sees_its_whole_review_thread_and_nothing_else(
    running: Stack,
) -> None:
    repository = "octo-user/Hello-World"
    running.fake.add_review_comment(
        repository, 2, "Could this be a helper?", "reviewer", in_reply_to=284312630
    )
    running.fake.add_review_comment(
        repository, 2, "Agreed, and it needs a test.", "maintainer", 284312630
    )
    running.fake.add_review_comment(repository, 2, "Unrelated nit elsewhere.")
    delivery_id, _ = running.send(
        "pull_request_review_comment.created.json", "pull_request_review_comment"
    )

    callback_of(running, delivery_id)
    instructions = conversation_of(running, delivery_id).instructions
    assert "The review thread so far:" in instructions
    assert "- reviewer: Could this be a helper?" in instructions
    assert "- maintainer: Agreed, and it needs a test." in instructions
    assert "Unrelated nit" not in instructions


def test_long_context_is_cut_with_a_visible_note(running: Stack) -> None:
    comments = [
        {"user": {"login": f"user{n}"}, "body": f"comment {n} " + "x" * 5000}
        for n in range(40)
    ]
    running.fake.add_issue(
        "octo-user/Hello-World", 1, "Long", "y" * 30_000, comments=comments
    )
    delivery_id, _ = running.send("issues.labeled.json", "issues")

    assert callback_of(running, delivery_id).status == "posted"
    instructions = conversation_of(running, delivery_id).instructions
    assert "Earlier comments (the 10 oldest are not shown):" in instructions
    assert "- user39: comment 39" in instructions
    assert "- user9: comment 9 " not in instructions
    assert "… (cut: 10000 more characters)" in instructions
    assert "… (cut: 1011 more characters)" in instructions


def test_a_long_thread_shows_its_newest_comments(running: Stack) -> None:
    comments = [
        {"user": {"login": f"user{n}"}, "body": f"comment {n:03d}"} for n in range(150)
    ]
    running.fake.add_issue("octo-user/Hello-World", 1, "Long", "", comments=comments)
    delivery_id, _ = running.send("issues.labeled.json", "issues")

    assert callback_of(running, delivery_id).status == "posted"
    instructions = conversation_of(running, delivery_id).instructions
    assert "- user149: comment 149" in instructions
    assert "- user120: comment 120" in instructions
    assert "comment 119" not in instructions
    assert "Earlier comments (the 120 oldest are not shown):" in instructions
    pages = [r.query.get("page") for r in running.fake.requests("GET", "/1/comments")]
    assert pages == ["2"]  # the last page holds 50: enough, one call


def test_secondary_rate_limit_403_waits_and_posts_once(running: Stack) -> None:
    running.fake.fail_next(
        "POST",
        r"/issues/1/comments$",
        403,
        retry_after=1,
        body={"message": "You have exceeded a secondary rate limit."},
    )
    delivery_id, _ = running.send("issue_comment.created.json", "issue_comment")

    callback_of(running, delivery_id)
    posts = running.fake.requests("POST", "/issues/1/comments")
    assert [p.status for p in posts] == [403, 201]
    assert posts[1].received_at - posts[0].received_at >= 1.0
    assert len(running.fake.comments()) == 1


def test_a_large_delivery_is_classified_from_the_inbox(running: Stack) -> None:
    # Over the gateway's by-reference size: its task message carries no body.
    payload = json.loads(fixture_bytes("issues.labeled.json"))
    payload["issue"]["body"] = "a long description " * 20_000
    body = json.dumps(payload).encode()
    delivery_id = str(uuid.uuid4())

    response = send_delivery(running.gateway_url, SECRET, "issues", body, delivery_id)

    assert len(body) > 256 * 1024
    assert response.status_code == 202
    assert verdict_of(running, delivery_id).verdict == "job"
    assert callback_of(running, delivery_id).status == "posted"
    assert len(running.fake.comments()) == 1
