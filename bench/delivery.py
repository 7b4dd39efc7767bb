"""Signed 8 KB deliveries, each with its own delivery id, body and issue number."""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import string
import uuid
from dataclasses import dataclass
from pathlib import Path

from webhook_gateway.app import EVENTS_PATH

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "examples" / "deliveries" / "issue_comment.created.json"
EVENT = "issue_comment"
SIZE = 8 * 1024
# Every body carries its sequence number in these seven digits (the issue number
# and the comment id), so no two bodies hash alike and each job comments on an
# issue of its own: the fake GitHub's comments can be counted per delivery.
_SLOT = "7777777"
FIRST_NUMBER = 1_000_000
# Hookline spends at most 80 content-creating calls a minute per installation, as
# GitHub's secondary limit demands, and a job makes three (the eyes reaction, the
# comment, the closing reaction). Twenty jobs per installation stay within one
# minute's allowance, so the bench measures the pipeline, not the allowance.
JOBS_PER_INSTALLATION = 20
_INSTALLATION_SLOT = "6666666"
FIRST_INSTALLATION = 2_000_000
_PAD = "x"


@dataclass(frozen=True)
class Delivery:
    """One request as GitHub would send it."""

    delivery_id: str
    event: str
    number: int
    body: bytes
    signature: str

    def request(self, host: str, path: str = EVENTS_PATH) -> bytes:
        """Return the whole HTTP/1.1 request, keep-alive, as GitHub's hookshot."""
        head = (
            f"POST {path} HTTP/1.1\r\n"
            f"Host: {host}\r\n"
            "User-Agent: GitHub-Hookshot/hookline-bench\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(self.body)}\r\n"
            f"X-GitHub-Event: {self.event}\r\n"
            f"X-GitHub-Delivery: {self.delivery_id}\r\n"
            f"X-Hub-Signature-256: {self.signature}\r\n"
            "\r\n"
        )
        return head.encode() + self.body


def _without_url_templates(value: object) -> object:
    """Drop the `*_url` links GitHub sends by the dozen; the classifier reads none."""
    if isinstance(value, dict):
        return {
            key: _without_url_templates(item)
            for key, item in value.items()
            if not key.endswith("_url") or key == "html_url"
        }
    if isinstance(value, list):
        return [_without_url_templates(item) for item in value]
    return value


def _template(size: int) -> list[bytes]:
    """Return the recorded comment delivery, cut to `size` bytes, split at the slot."""
    payload = _without_url_templates(json.loads(SOURCE.read_text()))
    payload.pop("organization", None)
    payload["installation"]["id"] = int(_INSTALLATION_SLOT)
    issue, comment = payload["issue"], payload["comment"]
    issue["number"] = int(_SLOT)
    issue["url"] = issue["url"].rsplit("/", 1)[0] + "/" + _SLOT
    comment["id"] = int("9" + _SLOT)
    comment["body"] = "@openhands the parser drops the last line of the file, fix it?"
    issue["body"] = ""

    text = json.dumps(payload, separators=(",", ":"))
    if len(text) > size:
        raise ValueError(f"the trimmed delivery is {len(text)} bytes, over {size}")
    issue["body"] = _PAD * (size - len(text))
    rendered = json.dumps(payload, separators=(",", ":")).encode()
    assert len(rendered) == size
    assert rendered.count(_INSTALLATION_SLOT.encode()) == 1
    return rendered.split(_SLOT.encode())


class Deliveries:
    """Make signed deliveries of one fixed size, numbered from FIRST_NUMBER."""

    def __init__(self, secret: str, size: int = SIZE) -> None:
        self._secret = secret.encode()
        self._parts = _template(size)

    def make(self, sequence: int) -> Delivery:
        """Return delivery number `sequence`, unique in id, body and issue."""
        number = FIRST_NUMBER + sequence
        if not FIRST_NUMBER <= number < 10_000_000:
            raise ValueError(f"sequence {sequence} does not fit the seven-digit slot")
        installation = FIRST_INSTALLATION + sequence // JOBS_PER_INSTALLATION
        body = str(number).encode().join(self._parts)
        body = body.replace(_INSTALLATION_SLOT.encode(), str(installation).encode())
        return self.sign(EVENT, body, number)

    def sign(self, event: str, body: bytes, number: int = 0) -> Delivery:
        """Return `body` as a delivery of `event` with a new id, signed."""
        digest = hmac.new(self._secret, body, hashlib.sha256).hexdigest()
        return Delivery(str(uuid.uuid4()), event, number, body, "sha256=" + digest)


def large_body(size: int, marker: str) -> bytes:
    """Return a push delivery of exactly `size` bytes: thousands of commits.

    Shaped like GitHub's large deliveries (many objects, prose, paths), not one
    giant string: the gateway's memory depends on the shape as well as the size.
    """
    rng = random.Random(marker)
    words = [
        "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9)))
        for _ in range(500)
    ]
    paragraphs = [
        " ".join(rng.choices(words, k=rng.randint(150, 450))) for _ in range(64)
    ]

    def commit(number: int) -> dict:
        sha = hashlib.sha1(
            f"{marker}/{number}".encode(), usedforsecurity=False
        ).hexdigest()
        person = {"name": "Octo User", "email": "octo@example.com"}
        return {
            "id": sha,
            "tree_id": hashlib.sha1(sha.encode(), usedforsecurity=False).hexdigest(),
            "distinct": True,
            "message": f"{paragraphs[number % 64]} ({number})",
            "timestamp": "2024-01-01T00:00:00Z",
            "url": f"https://github.com/octo-user/Hello-World/commit/{sha}",
            "author": {**person, "username": "octo-user"},
            "committer": {**person, "username": "octo-user"},
            "added": [f"src/module_{number % 97}/file_{number}.py"],
            "removed": [],
            "modified": ["README.md", f"docs/page_{number % 13}.md"],
        }

    payload = {
        "ref": "refs/heads/main",
        "after": hashlib.sha1(marker.encode(), usedforsecurity=False).hexdigest(),
        "repository": {"full_name": "octo-user/Hello-World"},
        "installation": {"id": FIRST_INSTALLATION},
        "commits": [],
    }
    room = size - len(json.dumps(payload).encode())
    number = 0
    while True:
        entry = commit(number)
        cost = len(json.dumps(entry).encode()) + 2
        if cost > room:
            break
        payload["commits"].append(entry)
        room -= cost
        number += 1
    if not payload["commits"]:
        raise ValueError(f"a body of {size} bytes cannot hold one commit")
    rendered = json.dumps(payload).encode()
    # Trailing spaces in the last message make up the exact size.
    last = payload["commits"][-1]
    last["message"] += " " * (size - len(rendered))
    rendered = json.dumps(payload).encode()
    assert len(rendered) == size
    return rendered
