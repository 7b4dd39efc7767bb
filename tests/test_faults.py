"""Workers killed mid-task: the job still completes, and GitHub sees it once."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.conftest import Stack
from tests.test_conversations import (
    _issue_numbers,
    callbacks_done,
    only_conversation,
    say,
)
from tests.test_pipeline import callback_of
from workers.celery_app import SWEEP_TASK, create_celery


def pool_children(stack: Stack, pool: str) -> list[int]:
    """Return the pids of the processes that run a pool's tasks."""
    pid = stack.workers[pool]
    return [
        int(child)
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    ]


def test_worker_killed_after_github_took_the_working_comment_posts_it_once(
    running: Stack,
) -> None:
    # GitHub stores the comment at once but its answer is 5 s late: the worker
    # is killed while it waits, as an OOM kill or a deploy would do.
    running.fake.fail_next("POST", r"/issues/1/comments$", 0, delay=5, late_answer=True)
    delivery_id, _ = running.send("issue_comment.created.json", "issue_comment")

    assert running.fake.wait_for(lambda fake: fake.comments(), timeout=30)
    for child in pool_children(running, "conversations"):
        os.kill(child, signal.SIGKILL)

    callback = callback_of(running, delivery_id)
    # The fake records the first POST once its late answer has gone out.
    assert running.fake.wait_for(
        lambda fake: fake.requests("POST", "/issues/1/comments"), timeout=10
    )
    time.sleep(0.5)
    assert callback.status == "posted"
    (comment,) = running.fake.comments()
    assert len(running.fake.requests("POST", "/issues/1/comments")) == 1
    assert callback.github_comment_id == comment["id"]
    assert "test agent finished" in comment["body"]
    assert "conversation.found_status_comment" in running.log_text()


def test_callback_worker_killed_after_github_took_the_comment_posts_once(
    running: Stack,
) -> None:
    # No "working on it" comment (GitHub refused it), so the result is a new
    # comment; GitHub stores it but answers 5 s late, and the worker is killed.
    running.fake.fail_next("POST", r"/issues/1/comments$", 403)
    running.fake.fail_next("POST", r"/issues/1/comments$", 0, delay=5, late_answer=True)
    delivery_id, _ = running.send("issue_comment.created.json", "issue_comment")

    assert running.fake.wait_for(lambda fake: fake.comments(), timeout=30)
    for child in pool_children(running, "callbacks"):
        os.kill(child, signal.SIGKILL)

    callback = callback_of(running, delivery_id)
    assert running.fake.wait_for(
        lambda fake: len(fake.requests("POST", "/issues/1/comments")) == 2,
        timeout=10,
    )
    time.sleep(0.5)
    assert callback.status == "posted"
    assert len(running.fake.comments()) == 1
    assert callback.github_comment_id == running.fake.comments()[0]["id"]
    assert "callback.found_posted" in running.log_text()


def test_classify_worker_killed_mid_task_still_starts_the_job_once(
    running: Stack,
) -> None:
    # The permission check hangs 5 s; the worker is killed while it waits.
    running.fake.fail_next("GET", r"/permission$", 0, delay=5)
    delivery_id, _ = running.send("issue_comment.created.json", "issue_comment")
    time.sleep(1.5)
    killed_at = time.monotonic()
    for child in pool_children(running, "classify"):
        os.kill(child, signal.SIGKILL)

    callback = callback_of(running, delivery_id)
    time.sleep(0.5)
    assert callback.status == "posted"
    (comment,) = running.fake.comments()
    assert "test agent finished" in comment["body"]
    # The broker handed the task to a new worker, which asked again.
    answered = running.fake.requests("GET", "/permission")
    assert any(r.received_at > killed_at and r.status == 200 for r in answered)


def test_agent_worker_killed_mid_run_is_run_again_after_its_lease(
    running: Stack,
) -> None:
    issue = next(_issue_numbers)
    say(running, issue, "@openhands sleep 4")
    conversation = only_conversation(running, issue, "running")
    for child in pool_children(running, "agent"):
        os.kill(child, signal.SIGKILL)
    # The lease is 6 s here; beat's sweep would find it lapsed, as this does.
    time.sleep(7)
    create_celery(running.settings).send_task(SWEEP_TASK)

    finished = only_conversation(running, issue, "finished")
    callbacks_done(running, finished, 1)
    assert finished.id == conversation.id
    assert finished.run_attempts == 2
    (comment,) = running.fake.comments()
    assert "test agent finished" in comment["body"]
