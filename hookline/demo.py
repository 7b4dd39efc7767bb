"""Run the whole pipeline on recorded GitHub deliveries and show what came back.

Starts a loopback fake of GitHub's API, runs the Procfile's release step, then its
gateway and worker pools under honcho, sends every delivery in
examples/deliveries/ signed as GitHub would, and prints for each one what Hookline
did: ignored and why, or the reaction and the comment it posted. Exits 1 if any
delivery did not get the outcome examples/deliveries/INDEX.json expects.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path

import redis
import requests
from sqlalchemy import select
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

from config.settings import Settings
from hookline.db import session_scope
from hookline.devtools import free_port, generate_app_key, send_delivery
from hookline.fake_github import FakeGitHub
from hookline.models import Callback, CallbackStatus, Delivery, Turn

ROOT = Path(__file__).resolve().parent.parent
POOLS = ["web", "classify", "conversations", "agent", "callbacks"]
DEMO_REDIS_URL = "redis://127.0.0.1:6379/13"
DEMO_APP_ID = "424242"


@dataclass
class Sent:
    """One recorded delivery as the demo sent it, and what it expects."""

    file: str
    event: str
    expect: str
    delivery_id: str
    status: int = 0
    outcome: list[str] = field(default_factory=list)
    ok: bool = False


def _procfile_command(name: str) -> str:
    for line in (ROOT / "Procfile").read_text().splitlines():
        process, _, command = line.partition(":")
        if process.strip() == name:
            return command.strip()
    raise SystemExit(f"The Procfile has no {name!r} process.")


def _check_redis(url: str) -> redis.Redis:
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError:
        raise SystemExit(
            f"Redis is not answering at {url}; start it (redis-server) or point "
            "REDIS_URL at one, then run the demo again."
        ) from None
    return client


def _wait_for_gateway(url: str) -> None:
    for attempt in Retrying(
        stop=stop_after_delay(30),
        wait=wait_fixed(0.2),
        # Refused until gunicorn listens, then slow until its workers have booted.
        retry=retry_if_exception_type((requests.ConnectionError, requests.Timeout)),
        reraise=True,
    ):
        with attempt:
            requests.get(url + "/healthz", timeout=5)


def _outcome_of(sent: Sent, database_url: str, fake: FakeGitHub) -> bool:
    """Fill in what happened to a delivery; return True once it is settled."""
    if sent.event == "ping" or sent.status >= 300:
        sent.outcome = [f"answered {sent.status}, nothing queued"]
        return True
    with session_scope(database_url) as session:
        delivery = session.scalars(
            select(Delivery).where(Delivery.delivery_id == sent.delivery_id)
        ).one_or_none()
        if delivery is None or delivery.verdict == "received":
            return False
        sent.outcome = [f"{delivery.verdict}: {delivery.reason}"]
        if delivery.verdict != "job":
            return True
        # Every request is a turn: the first of a conversation, or a follow-up.
        turn = session.scalars(
            select(Turn).where(Turn.delivery_id == sent.delivery_id)
        ).one_or_none()
        if turn is None:
            return False
        callback = session.scalars(
            select(Callback).where(
                Callback.conversation_id == turn.conversation_id,
                Callback.turn == turn.number,
                Callback.event.in_(["finished", "awaiting_input", "error"]),
            )
        ).one_or_none()
        if callback is None or callback.status == CallbackStatus.PENDING:
            return False
        conversation = turn.conversation
        sent.outcome.append(
            f"conversation {conversation.id}, turn {turn.number}: "
            f"{callback.event} (now {conversation.status})"
        )
        for reaction in fake.reactions():
            if reaction["path"] == turn.reaction_path:
                sent.outcome.append(
                    f"reaction {reaction['content']!r} on {reaction['path']}"
                )
        comments = [c for c in fake.comments() if c["id"] == callback.github_comment_id]
        if callback.status != CallbackStatus.POSTED or not comments:
            sent.outcome.append(f"callback {callback.status}: {callback.last_error}")
            return True
        edited = (
            " (the turn's 'working on it' comment, edited)"
            if comments[0].get("edits")
            else ""
        )
        sent.outcome.append(f"comment posted at {comments[0]['path']}{edited}:")
        sent.outcome.append(
            textwrap.indent(_visible(comments[0]["body"]), "  | ", lambda _: True)
        )
        return True


def _visible(body: str) -> str:
    """Return a comment as GitHub shows it: without its hidden marks."""
    return re.sub(r"\n*<!-- hookline:[^>]*-->", "", body).strip()


def _expected(sent: Sent) -> bool:
    verdict = sent.outcome[0] if sent.outcome else ""
    if sent.expect.startswith("job"):
        return verdict.startswith("job") and any(
            line.startswith("comment posted") for line in sent.outcome
        )
    if sent.expect.startswith("ignored"):
        return verdict.startswith("ignored")
    return sent.status == 200 and verdict.startswith("answered")


def run(deliveries: Path, timeout: float) -> int:
    """Run the demo; return the process exit code."""
    redis_url = os.environ.get("REDIS_URL", DEMO_REDIS_URL)
    client = _check_redis(redis_url)
    # Every key and queue of this run carries its own prefix: nothing an earlier,
    # interrupted demo left in Redis can reach this run, and nothing else is touched.
    prefix = f"hookline-demo-{uuid.uuid4().hex[:8]}:"

    workdir = Path(os.environ.get("HOOKLINE_DEMO_DIR", ROOT / "var" / "demo"))
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    key_path, public_key = generate_app_key(workdir)
    database_url = os.environ.get(
        "DATABASE_URL", f"sqlite:///{workdir / 'hookline.sqlite3'}"
    )
    secret = secrets.token_hex(20)
    port = free_port()
    fake = FakeGitHub(app_id=DEMO_APP_ID, public_key_pem=public_key).start()
    env = {
        **os.environ,
        "GITHUB_APP_WEBHOOK_SECRET": secret,
        "GITHUB_APP_ID": DEMO_APP_ID,
        "GITHUB_APP_PRIVATE_KEY_PATH": str(key_path),
        "GITHUB_API_URL": fake.url,
        "REDIS_URL": redis_url,
        "CELERY_BROKER_URL": redis_url,
        "CELERY_BROKER_KEYPREFIX": prefix,
        "HOOKLINE_REDIS_PREFIX": prefix,
        "DATABASE_URL": database_url,
        "WEB_HOST": "127.0.0.1",
        "PYTHONUNBUFFERED": "1",
        # The Procfile names bare commands (alembic, gunicorn, celery): this venv's.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    print(f"fake GitHub API: {fake.url}   database: {database_url}")
    print(f"logs of every process: {workdir / 'processes.log'}\n")

    # honcho would read a .env in the checkout and let it override these: hand it
    # the demo's own file instead, which also shows what the demo ran with.
    env_file = workdir / "demo.env"
    shown = {setting.name for setting in fields(Settings)} | {"WEB_HOST"}
    env_file.write_text(
        "".join(f"{name}={env[name]}\n" for name in sorted(shown & env.keys()))
    )
    log_file = (workdir / "processes.log").open("w")
    release = _procfile_command("release")
    subprocess.run(  # noqa: S602
        release,
        shell=True,
        cwd=ROOT,
        env=env,
        check=True,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    honcho = Path(sys.executable).with_name("honcho")
    processes = subprocess.Popen(
        [
            *(str(honcho), "-f", "Procfile", "-e", str(env_file)),
            *("start", "-p", str(port), *POOLS),
        ],
        cwd=ROOT,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    gateway = f"http://127.0.0.1:{port}"
    try:
        try:
            _wait_for_gateway(gateway)
        except (requests.ConnectionError, requests.Timeout):
            log_file.flush()
            tail = (workdir / "processes.log").read_text().splitlines()[-30:]
            print("The gateway did not start; the last lines of its log:")
            print("\n".join(tail))
            return 1
        return _send_all(gateway, secret, deliveries, database_url, fake, timeout)
    finally:
        os.killpg(processes.pid, signal.SIGTERM)
        try:
            processes.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(processes.pid, signal.SIGKILL)
        fake.stop()
        log_file.close()
        for key in client.scan_iter(f"{prefix}*", count=1000):
            client.delete(key)


def _send_all(
    gateway: str,
    secret: str,
    deliveries: Path,
    database_url: str,
    fake: FakeGitHub,
    timeout: float,
) -> int:
    index = json.loads((deliveries / "INDEX.json").read_text())
    sent: list[Sent] = []
    for entry in index:
        item = Sent(entry["file"], entry["event"], entry["expect"], str(uuid.uuid4()))
        body = (deliveries / item.file).read_bytes()
        response = send_delivery(gateway, secret, item.event, body, item.delivery_id)
        item.status = response.status_code
        sent.append(item)
    replay = _replay_checks(gateway, secret, deliveries, sent[0])

    deadline = time.monotonic() + timeout
    pending = list(sent)
    while pending and time.monotonic() < deadline:
        pending = [
            item for item in pending if not _outcome_of(item, database_url, fake)
        ]
        time.sleep(0.2)

    for item in sent:
        item.ok = item not in pending and _expected(item)
        _show(item)
    for line in replay:
        print(line)

    print("\nA conversation: a question, its answer, and an error on another issue\n")
    template = json.loads((deliveries / "issue_comment.created.json").read_bytes())
    for number, (issue, text, expect) in enumerate(SCENE, start=1):
        payload = copy.deepcopy(template)
        payload["issue"]["number"] = issue
        payload["comment"]["id"] = 990_000 + number
        payload["comment"]["body"] = text
        item = Sent(f"comment on issue #{issue}", "issue_comment", expect, "")
        item.delivery_id = str(uuid.uuid4())
        body = json.dumps(payload).encode()
        response = send_delivery(gateway, secret, item.event, body, item.delivery_id)
        item.status = response.status_code
        print(f"> {text}")
        deadline = time.monotonic() + timeout
        while not _outcome_of(item, database_url, fake):
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        item.ok = any(f": {expect} (now" in line for line in item.outcome)
        _show(item)
        sent.append(item)

    failures = sum(not item.ok for item in sent)
    comments, reactions = fake.comments(), fake.reactions()
    print(
        f"\n{len(sent) - failures}/{len(sent)} deliveries got the expected outcome; "
        f"fake GitHub received {len(comments)} comments and {len(reactions)} reactions."
    )
    print(
        "\nThe whole story of one delivery, from its verdict to every GitHub call:\n"
        f"  DATABASE_URL={database_url} .venv/bin/hookline explain DELIVERY_ID"
    )
    return 1 if failures else 0


# Comments the demo writes after the recorded deliveries, to show a question
# answered in the same conversation and an error; see hookline/demo_agent.py.
SCENE = [
    (
        7,
        "@openhands the parser drops the last line. Ask me first: should the old "
        "behaviour stay behind a flag?",
        "awaiting_input",
    ),
    (7, "@openhands replace it, no flag needed.", "finished"),
    (8, "@openhands fail on purpose, to show the error notice.", "error"),
]


def _show(item: Sent) -> None:
    mark = "ok  " if item.ok else "FAIL"
    print(f"{mark} {item.file}  (X-GitHub-Event: {item.event}, HTTP {item.status})")
    print(f"     delivery  {item.delivery_id}")
    print(f"     expected  {item.expect}")
    for line in item.outcome or ["no outcome recorded in time"]:
        print(textwrap.indent(line, "     "))
    print()


def _replay_checks(
    gateway: str, secret: str, deliveries: Path, first: Sent
) -> list[str]:
    body = (deliveries / first.file).read_bytes()
    again = send_delivery(gateway, secret, first.event, body, first.delivery_id)
    forged = send_delivery(gateway, "not-the-secret", first.event, body)
    return [
        f"replayed {first.file} with its delivery id: HTTP {again.status_code} "
        f"{again.json().get('status') or again.json().get('reason')}",
        f"sent {first.file} signed with a wrong secret: HTTP {forged.status_code} "
        f"{forged.json().get('reason')}",
    ]


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and run the demo."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--deliveries", type=Path, default=ROOT / "examples" / "deliveries"
    )
    parser.add_argument("--timeout", type=float, default=90.0)
    args = parser.parse_args(argv)
    sys.exit(run(args.deliveries, args.timeout))


if __name__ == "__main__":
    main()
