"""The probes on real Redis, a real broker and real PostgreSQL, and on dead ones.

A dead service is a refused port (127.0.0.1:1); a hung one is a socket this test
listens on and never answers, so that only the deadline can end the check.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest
import requests
from flask.testing import FlaskClient

from config.settings import load_settings
from tests.conftest import SECRET, Stack
from webhook_gateway.app import create_app

REDIS_URL = "redis://127.0.0.1:6379/15"
BROKER_URL = "redis://127.0.0.1:6379/12"
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"
REFUSED = {
    "redis": ("REDIS_URL", "redis://127.0.0.1:1/0"),
    "broker": ("CELERY_BROKER_URL", "redis://127.0.0.1:1/0"),
    "database": ("DATABASE_URL", "postgresql://postgres@127.0.0.1:1/test"),
}
HUNG_URL = {
    "redis": ("REDIS_URL", "redis://127.0.0.1:{port}/0"),
    "broker": ("CELERY_BROKER_URL", "redis://127.0.0.1:{port}/0"),
    "database": ("DATABASE_URL", "postgresql://postgres@127.0.0.1:{port}/test"),
}
ANSWER_WITHIN = 3.0


def gateway(database_url: str, **overrides: object) -> FlaskClient:
    settings = load_settings(
        environ={},
        overrides={
            "GITHUB_APP_WEBHOOK_SECRET": SECRET,
            "REDIS_URL": REDIS_URL,
            "CELERY_BROKER_URL": BROKER_URL,
            "DATABASE_URL": database_url,
            **overrides,
        },
    )
    return create_app(settings).test_client()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """Listen on a loopback port and never accept: connects land, nothing answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    yield listener.getsockname()[1]
    # Closing resets the queued connections, which ends the checks still waiting.
    listener.close()


def timed_get(client: FlaskClient, path: str) -> tuple[int, dict, float]:
    started = time.monotonic()
    response = client.get(path)
    return response.status_code, response.get_json(), time.monotonic() - started


def test_readyz_reports_each_dependency_ready(database_url: str) -> None:
    status, body, elapsed = timed_get(gateway(database_url), "/readyz")

    assert status == 200
    assert body == {
        "status": "ready",
        "checks": {"redis": "ok", "broker": "ok", "database": "ok"},
    }
    assert elapsed < ANSWER_WITHIN


def test_readyz_checks_a_rabbitmq_broker(database_url: str) -> None:
    client = gateway(database_url, CELERY_BROKER_URL=RABBITMQ_URL)

    status, body, _ = timed_get(client, "/readyz")

    assert status == 200
    assert body["checks"]["broker"] == "ok"


@pytest.mark.parametrize("dependency", sorted(REFUSED))
def test_readyz_names_a_refusing_dependency(database_url: str, dependency: str) -> None:
    setting, url = REFUSED[dependency]
    client = gateway(database_url, **{setting: url})

    status, body, elapsed = timed_get(client, "/readyz")

    assert status == 503
    assert body["reason"] == "dependency_unavailable"
    assert body["down"] == [dependency]
    assert body["checks"][dependency] == "down"
    assert dependency in body["message"]
    assert elapsed < ANSWER_WITHIN


@pytest.mark.parametrize("dependency", sorted(HUNG_URL))
def test_readyz_gives_up_on_a_silent_dependency(
    database_url: str, silent_port: int, dependency: str
) -> None:
    setting, url = HUNG_URL[dependency]
    client = gateway(database_url, **{setting: url.format(port=silent_port)})

    status, body, elapsed = timed_get(client, "/readyz")

    assert status == 503
    assert body["down"] == [dependency]
    assert body["checks"][dependency] in {"timeout", "down"}
    assert elapsed < ANSWER_WITHIN


def test_readyz_answers_at_once_while_earlier_checks_still_hang(
    database_url: str, silent_port: int
) -> None:
    hung = f"postgresql://postgres@127.0.0.1:{silent_port}/test"
    client = gateway(database_url, DATABASE_URL=hung)

    outcomes = [timed_get(client, "/readyz") for _ in range(4)]

    assert [status for status, _, _ in outcomes] == [503] * 4
    assert all(body["checks"]["database"] == "timeout" for _, body, _ in outcomes)
    # Two checks hang at most; the probes after them do not wait on a third.
    assert outcomes[-1][2] < 0.5


def test_readyz_shows_no_stack_trace_or_url(database_url: str) -> None:
    setting, url = REFUSED["database"]
    response = gateway(database_url, **{setting: url}).get("/readyz")

    text = response.get_data(as_text=True)
    assert response.status_code == 503
    assert "Traceback" not in text
    assert "127.0.0.1" not in text
    assert response.headers["Cache-Control"] == "no-store"


def test_healthz_touches_nothing() -> None:
    dead = "postgresql://postgres@127.0.0.1:1/test"
    client = gateway(
        dead, REDIS_URL="redis://127.0.0.1:1/0", CELERY_BROKER_URL=BROKER_URL
    )

    status, body, elapsed = timed_get(client, "/healthz")

    assert status == 200
    assert body == {"status": "ok"}
    assert elapsed < 0.5


def test_gunicorn_serves_the_probes(stack: Stack) -> None:
    live = requests.get(f"{stack.gateway_url}/healthz", timeout=5)
    ready = requests.get(f"{stack.gateway_url}/readyz", timeout=5)

    assert live.status_code == 200
    assert ready.status_code == 200, json.dumps(ready.json())
    assert set(ready.json()["checks"].values()) == {"ok"}
