"""The `hookline` command, run as an operator runs it, against the real stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hookline.devtools import free_port
from tests.conftest import FIXTURES, Stack
from tests.test_conversations import _issue_numbers, only_conversation, say
from tests.test_pipeline import callback_of, verdict_of

HOOKLINE = Path(sys.executable).with_name("hookline")


def hookline(stack: Stack, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {
        **os.environ,
        "GITHUB_APP_WEBHOOK_SECRET": stack.settings.GITHUB_APP_WEBHOOK_SECRET,
        "DATABASE_URL": stack.settings.DATABASE_URL,
        **env,
    }
    return subprocess.run(
        [str(HOOKLINE), *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_send_then_explain_traces_the_delivery_to_its_comment(running: Stack) -> None:
    fixture = str(FIXTURES / "issue_comment.created.json")
    sent = hookline(
        running,
        "--json",
        "send",
        fixture,
        "--event",
        "issue_comment",
        "--url",
        running.gateway_url,
    )
    assert sent.returncode == 0, sent.stderr
    delivery_id = json.loads(sent.stdout)["delivery"]
    assert json.loads(sent.stdout)["status"] == 202
    callback_of(running, delivery_id)

    explained = hookline(running, "explain", delivery_id)
    as_json = json.loads(hookline(running, "--json", "explain", delivery_id).stdout)

    assert explained.returncode == 0, explained.stderr
    assert "verdict    job: issue comment" in explained.stdout
    assert "callback finished: posted" in explained.stdout
    (comment,) = running.fake.comments()
    assert as_json["callbacks"][0]["comment"] == comment["id"]
    assert as_json["callbacks"][0]["path"] == (
        f"/repos/octo-user/Hello-World/issues/comments/{comment['id']}"
    )
    # Each GitHub call the pools made for it, in order, with its answer.
    calls = [(c["method"], c["path"], c["status"]) for c in as_json["github_calls"]]
    permission = "/repos/octo-user/Hello-World/collaborators/octo-user/permission"
    assert ("GET", permission, 200) in calls
    assert ("POST", "/repos/octo-user/Hello-World/issues/1/comments", 201) in calls
    assert (
        "PATCH",
        f"/repos/octo-user/Hello-World/issues/comments/{comment['id']}",
        200,
    ) in calls
    assert "GitHub calls:" in explained.stdout
    assert "queued -> running: agent run of turn 1 started" in explained.stdout
    assert [t["turn"] for t in as_json["turns"]] == [1]
    assert as_json["turns"][0]["this_delivery"] is True
    # The conversation id an error notice gives leads to the same trace, and
    # --json is taken after the command too.
    by_conversation = hookline(
        running, "explain", as_json["conversation"]["conversation"], "--json"
    )
    assert json.loads(by_conversation.stdout) == as_json


def test_explain_says_why_a_delivery_was_ignored(running: Stack) -> None:
    delivery_id, _ = running.send(
        "issue_comment.created.quoted-mention.json", "issue_comment"
    )
    verdict_of(running, delivery_id)
    explained = hookline(running, "explain", delivery_id)
    listed = hookline(running, "--json", "deliveries", "--limit", "50")

    assert "ignored: @openhands appears only in a quote" in explained.stdout
    assert delivery_id in [row["delivery"] for row in json.loads(listed.stdout)]


def test_unknown_delivery_is_not_found_with_exit_1(running: Stack) -> None:
    explained = hookline(running, "explain", "0000-not-a-delivery")

    assert explained.returncode == 1
    assert "no delivery 0000-not-a-delivery is recorded" in explained.stderr


def test_unreadable_file_and_missing_secret_are_usage_errors(running: Stack) -> None:
    missing = hookline(running, "send", "/nonexistent.json", "--event", "issues")
    secretless = hookline(
        running,
        "send",
        str(FIXTURES / "issues.labeled.json"),
        "--event",
        "issues",
        GITHUB_APP_WEBHOOK_SECRET="",
    )

    assert missing.returncode == 2
    assert "cannot read /nonexistent.json" in missing.stderr
    assert secretless.returncode == 2
    assert "GITHUB_APP_WEBHOOK_SECRET is not set" in secretless.stderr


def test_services_that_do_not_answer_give_exit_3_and_a_sentence(
    running: Stack,
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    unsent = hookline(
        running, "send", str(FIXTURES / "ping.json"), "--event", "ping", "--url", dead
    )
    no_database = hookline(
        running, "deliveries", DATABASE_URL="postgresql://postgres@127.0.0.1:1/x"
    )

    assert unsent.returncode == 3
    assert "did not answer" in unsent.stderr
    assert no_database.returncode == 3
    assert "the database did not answer" in no_database.stderr
    assert "Traceback" not in no_database.stderr + unsent.stderr


def test_a_database_without_tables_says_to_migrate(running: Stack, tmp_path) -> None:
    (tmp_path / "empty.sqlite3").touch()
    empty = hookline(
        running, "deliveries", DATABASE_URL=f"sqlite:///{tmp_path / 'empty.sqlite3'}"
    )

    assert empty.returncode == 3
    assert "has no Hookline tables yet: run `alembic upgrade head`" in empty.stderr


def test_a_sqlite_file_that_is_not_there_is_not_made(running: Stack, tmp_path) -> None:
    missing = tmp_path / "hookline.sqlite3"
    answer = hookline(running, "explain", "an-id", DATABASE_URL=f"sqlite:///{missing}")

    assert answer.returncode == 2
    assert f"there is no database at {missing}" in answer.stderr
    assert not missing.exists()


def test_stop_ends_an_open_conversation_once(running: Stack, environment) -> None:
    issue = next(_issue_numbers)
    say(running, issue, "@openhands sleep 30")
    conversation = only_conversation(running, issue, "running")
    broker = {
        name: environment[name]
        for name in ("CELERY_BROKER_URL", "CELERY_BROKER_KEYPREFIX", "REDIS_URL")
    }

    stopped = hookline(
        running, "stop", str(conversation.id), "--reason", "maintenance", **broker
    )
    again = hookline(running, "stop", str(conversation.id), **broker)
    garbled = hookline(running, "stop", "not-an-id", **broker)

    assert stopped.returncode == 0, stopped.stderr
    assert f"stopped conversation {conversation.id}" in stopped.stdout
    only_conversation(running, issue, "stopped")
    assert running.fake.wait_for(
        lambda fake: any(
            "Stopped (stopped by an operator" in c["body"] for c in fake.comments()
        ),
        timeout=30,
    )
    (notice,) = [c for c in running.fake.comments() if "maintenance" in c["body"]]
    assert notice["body"].startswith("Stopped (stopped by an operator: maintenance).")
    assert again.returncode == 1
    assert "is stopped: there is nothing to stop" in again.stderr
    assert garbled.returncode == 2


def test_replay_classifies_a_stored_delivery_again_under_a_new_id(
    running: Stack, environment
) -> None:
    # Refused at first (the author could only read), then fixed and replayed.
    running.fake.set_permission("octo-user/Hello-World", "octo-user", "read")
    delivery_id, _ = running.send("issue_comment.created.json", "issue_comment")
    assert verdict_of(running, delivery_id).verdict == "ignored"
    running.fake.set_permission("octo-user/Hello-World", "octo-user", "write")
    broker = {
        name: environment[name]
        for name in ("CELERY_BROKER_URL", "CELERY_BROKER_KEYPREFIX", "REDIS_URL")
    }

    replayed = hookline(running, "--json", "replay", delivery_id, **broker)
    unknown = hookline(running, "replay", "no-such-delivery", **broker)

    assert replayed.returncode == 0, replayed.stderr
    copy = json.loads(replayed.stdout)
    assert copy["replay_of"] == delivery_id
    assert copy["delivery"].startswith(f"{delivery_id}-replay-")
    assert verdict_of(running, copy["delivery"]).verdict == "job"
    callback_of(running, copy["delivery"])
    (comment,) = running.fake.comments()
    assert "test agent finished" in comment["body"]
    assert verdict_of(running, delivery_id).verdict == "ignored"
    assert unknown.returncode == 1
    assert "no delivery no-such-delivery is in the inbox" in unknown.stderr


def test_a_failed_write_is_listed_and_retried_once(running: Stack, environment) -> None:
    running.fake.fail_next("PATCH", r"/issues/comments/\d+$", 404)
    delivery_id, _ = running.send("issue_comment.created.json", "issue_comment")
    failed = callback_of(running, delivery_id)
    assert failed.status == "failed"
    broker = {
        name: environment[name]
        for name in ("CELERY_BROKER_URL", "CELERY_BROKER_KEYPREFIX", "REDIS_URL")
    }

    listed = json.loads(hookline(running, "failed", "--json").stdout)
    retried = hookline(running, "retry", str(failed.id), **broker)
    again = hookline(running, "retry", str(failed.id), **broker)

    assert failed.id in [row["callback"] for row in listed]
    assert retried.returncode == 0, retried.stderr
    assert running.fake.wait_for(
        lambda fake: "test agent finished" in fake.comments()[0]["body"], timeout=30
    )
    (comment,) = running.fake.comments()
    assert comment["edits"] == 1
    assert again.returncode == 1
    assert "not failed" in again.stderr
