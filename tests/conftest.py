"""Fixtures on the real services: PostgreSQL, Redis, Celery workers, gunicorn.

The only stand-in is the loopback fake of GitHub's API (hookline.fake_github).
Redis database 14 is the broker and 15 holds dedup keys and tokens; both are
emptied when the session starts. Each session migrates a PostgreSQL database of
its own and drops it at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2
import psycopg2.errors
import pytest
import redis
from alembic import command
from alembic.config import Config
from sqlalchemy import update
from sqlalchemy.engine import make_url

from config.settings import Settings, load_settings
from hookline.db import session_scope
from hookline.devtools import free_port, generate_app_key, send_delivery
from hookline.fake_github import FakeGitHub
from hookline.fake_openhands import FakeOpenHands
from hookline.models import Conversation

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "examples" / "deliveries"
ADMIN_DATABASE_URL = os.environ.get(
    "HOOKLINE_TEST_ADMIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
BROKER_URL = os.environ.get("HOOKLINE_TEST_BROKER_URL", "redis://127.0.0.1:6379/14")
REDIS_URL = os.environ.get("HOOKLINE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
# Every Redis key and broker queue of this run carries it, so that runs side by
# side (a developer's and a helper's) do not take each other's tasks.
PREFIX = f"hookline-test-{uuid.uuid4().hex[:8]}:"
APP_ID = "31337"
SECRET = "test-webhook-secret"
POOLS = ("classify", "conversations", "agent", "callbacks")


def fixture_bytes(name: str) -> bytes:
    """Return a recorded delivery's exact bytes."""
    return (FIXTURES / name).read_bytes()


def migrate(database_url: str) -> None:
    """Bring a database to the newest schema, as the Procfile's release step does."""
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", database_url)
    config.attributes["configure_logger"] = False
    command.upgrade(config, "head")


# A test database is named for the hour it was made in; one from a run that is
# long over (killed before it could drop it) is dropped by the next run.
ABANDONED_AFTER = 6 * 3600


def new_database_name(kind: str = "test") -> str:
    """Return a new database name that says when it was made."""
    return f"hookline_{kind}_{int(time.time())}_{uuid.uuid4().hex[:6]}"


def _drop_abandoned_databases(admin: psycopg2.extensions.connection) -> None:
    """Drop test databases runs left behind hours ago; never a live run's."""
    with admin.cursor() as cursor:
        cursor.execute(
            "SELECT datname FROM pg_database"
            " WHERE datname LIKE 'hookline_test_%' OR datname LIKE 'hookline_migrate_%'"
        )
        names = [name for (name,) in cursor.fetchall()]
    for name in names:
        made = name.split("_")[2]
        if made.isdigit() and time.time() - int(made) < ABANDONED_AFTER:
            continue
        # Another run may be dropping it too, or still using it.
        with (
            contextlib.suppress(
                psycopg2.errors.ObjectInUse, psycopg2.errors.InvalidCatalogName
            ),
            admin.cursor() as cursor,
        ):
            cursor.execute(f'DROP DATABASE "{name}"')


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """Create, migrate and finally drop a PostgreSQL database for this session."""
    name = new_database_name()
    admin = psycopg2.connect(ADMIN_DATABASE_URL)
    admin.autocommit = True
    _drop_abandoned_databases(admin)
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    url = make_url(ADMIN_DATABASE_URL).set(database=name)
    rendered = url.render_as_string(hide_password=False)
    migrate(rendered)
    yield rendered
    from hookline.db import engine_for

    engine_for(rendered).dispose()
    with admin.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


# Where in-process gateways (tests/webhook_gateway/conftest.py) keep their inbox.
INBOX: dict[str, str] = {}


@pytest.fixture(scope="session", autouse=True)
def _inbox_database(database_url: str) -> None:
    INBOX["url"] = database_url


@pytest.fixture(scope="session")
def redis_client() -> redis.Redis:
    """Return the Redis database that holds dedup keys and tokens."""
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()
    return client


@pytest.fixture(scope="session")
def app_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """Return a throwaway GitHub App private key path and its public key."""
    return generate_app_key(tmp_path_factory.mktemp("app-key"))


@pytest.fixture(scope="session")
def fake_github(app_key: tuple[Path, bytes]) -> Iterator[FakeGitHub]:
    """Run the loopback fake of GitHub's API for the whole session."""
    fake = FakeGitHub(app_id=APP_ID, public_key_pem=app_key[1]).start()
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def environment(
    database_url: str, app_key: tuple[Path, bytes], fake_github: FakeGitHub
) -> dict[str, str]:
    """Return the settings every process of the stack runs with."""
    return {
        "GITHUB_APP_WEBHOOK_SECRET": SECRET,
        "GITHUB_APP_ID": APP_ID,
        "GITHUB_APP_PRIVATE_KEY_PATH": str(app_key[0]),
        "GITHUB_API_URL": fake_github.url,
        "REDIS_URL": REDIS_URL,
        "CELERY_BROKER_URL": BROKER_URL,
        "CELERY_BROKER_KEYPREFIX": PREFIX,
        "HOOKLINE_REDIS_PREFIX": PREFIX,
        "DATABASE_URL": database_url,
        "HOOKLINE_AGENT_COMMAND": f"{sys.executable} {ROOT / 'tests' / 'agent.py'}",
        "HOOKLINE_AGENT_TIMEOUT": "20",
        "HOOKLINE_GITHUB_TIMEOUT": "2",
        "HOOKLINE_RETRY_BASE": "0.2",
        "HOOKLINE_MAX_RETRIES": "4",
        "HOOKLINE_LEASE_SECONDS": "6",
        "LOG_FORMAT": "json",
    }


@pytest.fixture(scope="session")
def settings(environment: dict[str, str]) -> Settings:
    """Return the stack's settings as the processes read them."""
    return load_settings(environment)


@dataclass
class Stack:
    """The running gateway and pools, and the ways a test talks to them."""

    gateway_url: str
    settings: Settings
    fake: FakeGitHub
    logs: Path
    workers: dict[str, int] = field(default_factory=dict)  # name: main pid

    def send(
        self, name: str, event: str, delivery_id: str | None = None
    ) -> tuple[str, int]:
        """Send a recorded delivery signed as GitHub would; return id and status."""
        delivery_id = delivery_id or str(uuid.uuid4())
        response = send_delivery(
            self.gateway_url, SECRET, event, fixture_bytes(name), delivery_id
        )
        return delivery_id, response.status_code

    def log_records(self) -> list[dict]:
        """Return every JSON log line the stack's processes wrote so far."""
        return [
            json.loads(line)
            for line in self.log_text().splitlines()
            if line.startswith("{")
        ]

    def log_text(self) -> str:
        """Return everything the stack's processes logged so far."""
        return "\n".join(path.read_text() for path in sorted(self.logs.glob("*.log")))


def start_process(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start a command in its own process group, its output going to `log`."""
    if args[0] == "celery":
        args = [sys.executable, "-m", *args]
    return subprocess.Popen(
        args,
        cwd=ROOT,
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `predicate` until it holds, or fail naming `what` did not happen."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.1)


def stop_processes(*processes: subprocess.Popen) -> None:
    """Ask each process group to stop, then kill the ones still there after 15 s."""
    for process in processes:
        os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


@contextmanager
def launched(
    environment: dict[str, str],
    fake: FakeGitHub,
    logs: Path,
    workers: dict[str, str],
) -> Iterator[Stack]:
    """Run gunicorn and one Celery worker per entry of `workers` (name: queues)."""
    port = free_port()
    env = {**environment, "PORT": str(port), "WEB_HOST": "127.0.0.1"}
    gunicorn = Path(sys.executable).with_name("gunicorn")
    processes = [
        start_process(
            [str(gunicorn), "-c", "config/gunicorn.py", "webhook_gateway.wsgi:app"],
            env,
            logs / "web.log",
        )
    ]
    for name, queues in workers.items():
        processes.append(
            start_process(
                [
                    *("celery", "-A", "workers.celery_app", "worker"),
                    *("-Q", queues, "-n", f"{name}@test", "--concurrency", "2"),
                    *("--without-gossip", "--without-mingle", "-l", "INFO"),
                ],
                env,
                logs / f"{name}.log",
            )
        )
    try:
        for name in workers:
            wait_until(
                lambda name=name: "ready." in (logs / f"{name}.log").read_text(),
                60,
                f"the {name} worker starting",
            )
        wait_until(
            lambda: "Booting worker" in (logs / "web.log").read_text(),
            30,
            "gunicorn starting",
        )
        yield Stack(
            f"http://127.0.0.1:{port}",
            load_settings(environment),
            fake,
            logs,
            {
                name: process.pid
                for name, process in zip(workers, processes[1:], strict=True)
            },
        )
    finally:
        stop_processes(*processes)


@pytest.fixture(scope="session")
def stack(
    environment: dict[str, str],
    fake_github: FakeGitHub,
    redis_client: redis.Redis,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """Run the gateway and one worker per pool, as the Procfile does."""
    broker = redis.Redis.from_url(BROKER_URL)
    logs = tmp_path_factory.mktemp("stack-logs")
    with launched(
        environment, fake_github, logs, {pool: pool for pool in POOLS}
    ) as running_stack:
        yield running_stack
    for client in (broker, redis_client):
        forget_keys(client, PREFIX)


OPENHANDS_KEY = "test-openhands-key"


@pytest.fixture(scope="session")
def openhands_stack(
    environment: dict[str, str],
    fake_github: FakeGitHub,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """Run a second stack whose agents are OpenHands conversations, on its fake.

    Its keys and queues live under a prefix of their own, so the two stacks
    never take each other's tasks; both talk to the same fake GitHub.
    """
    fake = FakeOpenHands(api_key=OPENHANDS_KEY).start()
    prefix = f"{PREFIX}openhands:"
    env = {
        **environment,
        "HOOKLINE_RUNTIME": "openhands",
        "OPENHANDS_URL": fake.url,
        "OPENHANDS_API_KEY": OPENHANDS_KEY,
        "OPENHANDS_POLL_INTERVAL": "0.1",
        "OPENHANDS_POLL_MAX_INTERVAL": "0.5",
        "CELERY_BROKER_KEYPREFIX": prefix,
        "HOOKLINE_REDIS_PREFIX": prefix,
    }
    logs = tmp_path_factory.mktemp("openhands-stack-logs")
    try:
        with launched(env, fake_github, logs, {pool: pool for pool in POOLS}) as stack:
            yield stack
    finally:
        fake.stop()


def forget_keys(
    client: redis.Redis, prefix: str, keep: str | tuple[str, ...] | None = None
) -> None:
    """Delete this run's keys under `prefix`, except those under `keep`."""
    kept = tuple(k.encode() for k in ((keep,) if isinstance(keep, str) else keep or ()))
    for key in client.scan_iter(f"{prefix}*", count=1000):
        if not (kept and key.startswith(kept)):
            client.delete(key)


@pytest.fixture
def running(stack: Stack, redis_client: redis.Redis) -> Stack:
    """Return the stack with the fake GitHub, replay keys and open talks cleared."""
    return cleared(stack, redis_client)


@pytest.fixture
def running_openhands(openhands_stack: Stack, redis_client: redis.Redis) -> Stack:
    """Return the OpenHands stack, cleared as `running` clears the other."""
    return cleared(openhands_stack, redis_client)


def cleared(stack: Stack, redis_client: redis.Redis) -> Stack:
    """Clear the fake GitHub, the replay keys and the open conversations.

    A conversation an earlier test left open would take this test's mentions
    on the same issue as follow-ups; each test starts with none open.
    """
    stack.fake.reset()
    with session_scope(stack.settings.DATABASE_URL) as session:
        session.execute(
            update(Conversation)
            .where(Conversation.status.in_(["queued", "running", "awaiting_input"]))
            .values(status="stopped", lease_expires_at=None)
        )
    tokens = (f"{PREFIX}installation-token:", f"{PREFIX}openhands:installation-token:")
    forget_keys(redis_client, PREFIX, keep=tokens)
    return stack
