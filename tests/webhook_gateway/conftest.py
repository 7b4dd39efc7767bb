"""The gateway in-process on real Redis, publishing to a broker nobody reads.

No worker consumes QUIET_BROKER_URL, so a test counts exactly what a request
queued.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest
import redis
from flask.testing import FlaskClient

from config.settings import load_settings
from tests.conftest import INBOX, PREFIX, REDIS_URL, SECRET
from webhook_gateway.app import create_app

QUIET_BROKER_URL = "redis://127.0.0.1:6379/12"
QUEUE = f"{PREFIX}classify"
# The session's migrated database, for the inbox (set by tests/conftest.py).
_inbox = INBOX


def gateway(**overrides: object) -> FlaskClient:
    settings = load_settings(
        environ={},
        overrides={
            "GITHUB_APP_WEBHOOK_SECRET": SECRET,
            "REDIS_URL": REDIS_URL,
            "CELERY_BROKER_URL": QUIET_BROKER_URL,
            "CELERY_BROKER_KEYPREFIX": PREFIX,
            "HOOKLINE_REDIS_PREFIX": PREFIX,
            "DATABASE_URL": _inbox["url"],
            **overrides,
        },
    )
    return create_app(settings).test_client()


@pytest.fixture
def broker() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(QUIET_BROKER_URL)
    client.delete(QUEUE)
    yield client
    client.delete(QUEUE)


@pytest.fixture
def client(redis_client: redis.Redis, broker: redis.Redis) -> FlaskClient:
    for key in redis_client.scan_iter(f"{PREFIX}delivery:*"):
        redis_client.delete(key)
    for key in redis_client.scan_iter(f"{PREFIX}body:*"):
        redis_client.delete(key)
    return gateway()


def queued(broker: redis.Redis) -> list[dict]:
    """Return the kwargs of every task message waiting in the classify queue."""
    messages = [json.loads(raw) for raw in broker.lrange(QUEUE, 0, -1)]
    return [json.loads(base64.b64decode(m["body"]))[1] for m in messages]
