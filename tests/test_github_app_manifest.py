"""The GitHub App manifest asks for exactly the events and permissions Hookline uses.

Events come from the recorded deliveries that start a job and from what the
classifier handles; permissions from every call the pools made to the fake GitHub
while answering those deliveries, looked up in GitHub's table of the permission
each endpoint needs.
"""

from __future__ import annotations

import json
import re

import pytest

from tasks.triggers import MalformedPayload, classify
from tasks.workflow_runs import parse_run
from tests.conftest import FIXTURES, ROOT, Stack
from webhook_gateway.app import EVENTS_PATH

MANIFEST = json.loads((ROOT / "github-app-manifest.json").read_text())
INDEX = json.loads((FIXTURES / "INDEX.json").read_text())
JOBS = [entry for entry in INDEX if entry["expect"].startswith("job:")]
LEVELS = {"read": 1, "write": 2}
# Events that start no job but are tracked (CI on a conversation's branch), and
# the permission GitHub requires to send them.
TRACKED = {"workflow_run"}
SUBSCRIPTION_PERMISSIONS = {"actions": "read"}

_REPO = r"/repos/[^/]+/[^/]+"
# Per GitHub's "Permissions required for GitHub Apps"; None: the App's JWT suffices.
ENDPOINT_PERMISSIONS: list[tuple[str, str, tuple[str, str] | None]] = [
    ("POST", r"/app/installations/\d+/access_tokens", None),
    ("GET", _REPO + r"/collaborators/[^/]+/permission", ("metadata", "read")),
    ("GET", _REPO + r"/issues/\d+", ("issues", "read")),
    ("GET", _REPO + r"/issues/\d+/comments", ("issues", "read")),
    ("GET", _REPO + r"/pulls/\d+", ("pull_requests", "read")),
    ("GET", _REPO + r"/pulls/\d+/comments", ("pull_requests", "read")),
    ("POST", _REPO + r"/issues/\d+/reactions", ("issues", "write")),
    ("POST", _REPO + r"/issues/comments/\d+/reactions", ("issues", "write")),
    ("POST", _REPO + r"/pulls/comments/\d+/reactions", ("pull_requests", "write")),
    ("POST", _REPO + r"/issues/\d+/comments", ("issues", "write")),
    ("PATCH", _REPO + r"/issues/comments/\d+", ("issues", "write")),
    ("PATCH", _REPO + r"/pulls/comments/\d+", ("pull_requests", "write")),
    (
        "POST",
        _REPO + r"/pulls/\d+/comments/\d+/replies",
        ("pull_requests", "write"),
    ),
]


def permission_for(method: str, path: str) -> tuple[str, str] | None:
    """Return the permission a call needs; fail on a call the table does not know."""
    for known_method, pattern, permission in ENDPOINT_PERMISSIONS:
        if method == known_method and re.fullmatch(pattern, path):
            return permission
    raise AssertionError(
        f"{method} {path} is new: add the permission it needs to the table above, "
        "to github-app-manifest.json and to docs/OPERATIONS.md"
    )


def test_manifest_subscribes_to_the_events_that_start_jobs() -> None:
    events = MANIFEST["default_events"]

    assert len(events) == len(set(events))
    assert set(events) == {entry["event"] for entry in JOBS} | TRACKED


def test_every_subscribed_event_is_one_the_classifier_reads() -> None:
    for event in set(MANIFEST["default_events"]) - TRACKED:
        reason = classify(event, {}, "openhands", "@openhands").reason

        assert reason == "no App installation in the delivery", (event, reason)


def test_installation_events_need_no_subscription() -> None:
    # GitHub sends them to every App; the classifier records them all the same.
    assert "installation" not in MANIFEST["default_events"]
    assert classify("installation", {}, "openhands", "@openhands").trigger is None


def test_manifest_points_github_at_the_gateway_route() -> None:
    hook = MANIFEST["hook_attributes"]

    assert hook["url"].startswith("https://")
    assert hook["url"].endswith(EVENTS_PATH)
    assert hook["active"] is True
    assert MANIFEST["public"] is False
    assert MANIFEST["request_oauth_on_install"] is False


def test_manifest_asks_for_exactly_the_permissions_the_pools_use(
    running: Stack,
) -> None:
    for count, entry in enumerate(JOBS, start=1):
        _, status = running.send(entry["file"], entry["event"])
        assert status == 202
        assert running.fake.wait_for(
            lambda fake, count=count: len(fake.comments()) >= count, timeout=30
        ), f"{entry['file']} was not answered"

    needed: dict[str, str] = {}
    for call in running.fake.requests():
        permission = permission_for(call.method, call.path)
        if permission is None:
            continue
        name, level = permission
        needed[name] = max(level, needed.get(name, level), key=LEVELS.__getitem__)

    assert MANIFEST["default_permissions"] == {**SUBSCRIPTION_PERMISSIONS, **needed}


def test_tracked_events_are_read_by_their_own_parser() -> None:
    with pytest.raises(MalformedPayload, match="workflow_run is not an object"):
        parse_run({})
