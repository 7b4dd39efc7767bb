"""Services that go away under load: no accepted delivery is lost, none done twice.

These tests start servers of their own on loopback (a redis-server that is
killed and restarted empty), so that nothing else on the machine is touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
import redis
from sqlalchemy import Engine, create_engine, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from hookline.db import driver_url, engine_for, session_scope
from hookline.devtools import free_port, send_delivery
from hookline.fake_github import FakeGitHub
from hookline.models import Delivery
from tests.conftest import (
    ADMIN_DATABASE_URL,
    SECRET,
    Stack,
    fixture_bytes,
    launched,
    migrate,
    new_database_name,
    wait_until,
)
from workers.celery_app import SWEEP_INBOX_TASK, create_celery

POOLS = {"classify": "classify", "rest": "conversations,agent,callbacks"}


class OwnRedis:
    """A redis-server of the test's own that keeps nothing on disk."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(self.directory)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        wait_until(lambda: _answers(client), 10, "redis-server starting")

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.kill()


@pytest.fixture
def fresh_database() -> Iterator[str]:
    """Return a migrated database of the test's own, dropped afterwards.

    The inbox sweep queues every delivery left unclassified; the session's
    database holds many that other tests' quiet gateways stored on purpose.
    """
    name = new_database_name()
    admin = psycopg2.connect(ADMIN_DATABASE_URL)
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    url = make_url(ADMIN_DATABASE_URL).set(database=name)
    rendered = url.render_as_string(hide_password=False)
    try:
        migrate(rendered)
        yield rendered
    finally:
        engine_for(rendered).dispose()
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def comment_on(number: int, text: str = "@openhands fix it") -> bytes:
    payload = json.loads(fixture_bytes("issue_comment.created.json"))
    payload["issue"]["number"] = number
    payload["comment"]["id"] = 8_000_000 + number
    payload["comment"]["body"] = text
    return json.dumps(payload).encode()


def accept(stack: Stack, number: int, text: str = "@openhands fix it") -> str:
    """Send a comment on issue `number` until the gateway takes it, as GitHub's
    redelivery would after a 503; return its delivery id."""
    delivery_id = str(uuid.uuid4())
    deadline = time.monotonic() + 60
    while True:
        response = send_delivery(
            stack.gateway_url,
            SECRET,
            "issue_comment",
            comment_on(number, text),
            delivery_id,
        )
        if response.status_code == 202:
            return delivery_id
        assert response.status_code == 503, response.text
        assert time.monotonic() < deadline, "the gateway kept answering 503"
        time.sleep(0.5)


def test_redis_restarted_empty_under_load_loses_no_accepted_delivery(
    environment: dict[str, str],
    fake_github: FakeGitHub,
    own_redis: OwnRedis,
    fresh_database: str,
    tmp_path: Path,
) -> None:
    fake_github.reset()
    env = {
        **environment,
        "DATABASE_URL": fresh_database,
        # One Redis for claims, tokens and the broker, as in a small deployment.
        "REDIS_URL": own_redis.url,
        "CELERY_BROKER_URL": own_redis.url,
        "HOOKLINE_INBOX_REQUEUE_AFTER": "1",
    }
    numbers = list(range(6001, 6021))
    logs = tmp_path / "logs"
    logs.mkdir()
    with launched(env, fake_github, logs, POOLS) as stack:
        # The classifier is frozen, so the first deliveries wait in Redis.
        os.killpg(stack.workers["classify"], signal.SIGSTOP)
        try:
            accepted = [accept(stack, number) for number in numbers[:10]]
            own_redis.kill()
            own_redis.start()
            accepted += [accept(stack, number) for number in numbers[10:]]
        finally:
            os.killpg(stack.workers["classify"], signal.SIGCONT)
        celery = create_celery(stack.settings)
        swept_at = [0.0]

        def all_answered() -> bool:
            # As beat does, every few seconds here rather than every minute.
            if time.monotonic() - swept_at[0] > 5:
                celery.send_task(SWEEP_INBOX_TASK)
                swept_at[0] = time.monotonic()
            with session_scope(stack.settings.DATABASE_URL) as session:
                verdicts = session.scalars(
                    select(Delivery.verdict).where(Delivery.delivery_id.in_(accepted))
                ).all()
            done = sum(v == "job" for v in verdicts) == len(accepted)
            posted = Counter(
                c["number"]
                for c in fake_github.comments()
                if "test agent finished" in c["body"]
            )
            return done and set(posted) == set(numbers)

        wait_until(all_answered, 120, "every accepted delivery answered")
        time.sleep(2)
        swept = [r for r in stack.log_records() if r["message"] == "inbox.swept"]

    per_issue = Counter(c["number"] for c in fake_github.comments())
    assert len(accepted) == 20
    # Exactly one comment on each issue: nothing lost, nothing doubled.
    assert per_issue == dict.fromkeys(numbers, 1)
    # The first ten waited in Redis when it died (bar one the frozen worker may
    # have popped already): the inbox brought them back.
    assert sum(r["requeued"] for r in swept) >= 9


PG_BIN = Path("/usr/lib/postgresql/15/bin")


class OwnPostgres:
    """A PostgreSQL cluster of the test's own, run as the postgres user."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.data = directory / "data"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/hookline"

    def _as_postgres(self, *args: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *args],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def create(self) -> None:
        shutil.chown(self.directory, "postgres")
        self._as_postgres(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
        )
        self.start()
        self._as_postgres(
            str(PG_BIN / "createdb"),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "hookline",
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1"
            " -c fsync=off"
        )
        self._as_postgres(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.directory / "log"),
            "-w",
            "start",
        )

    def stop(self) -> None:
        self._as_postgres(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"
        )


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    # Under /tmp itself: the postgres user cannot enter pytest's root-only folders.
    directory = Path(tempfile.mkdtemp(prefix="hookline-postgres-"))
    server = OwnPostgres(directory)
    try:
        server.create()
        migrate(server.url)
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def test_postgres_stopped_and_started_under_load_finishes_every_job_once(
    environment: dict[str, str],
    fake_github: FakeGitHub,
    own_postgres: OwnPostgres,
    tmp_path: Path,
) -> None:
    fake_github.reset()
    prefix = f"{environment['HOOKLINE_REDIS_PREFIX']}pg-outage:"
    env = {
        **environment,
        "DATABASE_URL": own_postgres.url,
        "CELERY_BROKER_KEYPREFIX": prefix,
        "HOOKLINE_REDIS_PREFIX": prefix,
    }
    before, during = list(range(7001, 7005)), [7005, 7006]
    logs = tmp_path / "logs"
    logs.mkdir()
    with launched(env, fake_github, logs, POOLS) as stack:
        accepted = [accept(stack, n, "@openhands sleep 3") for n in before]
        engine = create_engine(driver_url(own_postgres.url))
        try:
            wait_until(
                lambda: _count(engine, "running") >= 1, 30, "an agent run under way"
            )
        finally:
            engine.dispose()
        own_postgres.stop()
        refused = [
            send_delivery(
                stack.gateway_url, SECRET, "issue_comment", comment_on(n)
            ).status_code
            for n in during
        ]
        time.sleep(4)
        own_postgres.start()
        accepted += [accept(stack, n) for n in during]

        def answered() -> bool:
            posted = [
                c["number"]
                for c in fake_github.comments()
                if "test agent finished" in c["body"]
            ]
            return sorted(set(posted)) == before + during

        wait_until(answered, 120, "every accepted delivery answered")
        time.sleep(2)

    per_issue = Counter(c["number"] for c in fake_github.comments())
    assert refused == [503, 503]
    assert len(accepted) == 6
    assert per_issue == dict.fromkeys(before + during, 1)


def _count(engine: Engine, status: str) -> int:
    try:
        with engine.connect() as connection:
            return connection.execute(
                text("SELECT count(*) FROM conversations WHERE status = :s"),
                {"s": status},
            ).scalar_one()
    except OperationalError:
        return 0
