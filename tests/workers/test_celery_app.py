"""The Celery app refuses settings that would make the Redis broker run tasks twice."""

from __future__ import annotations

import pytest

from config.settings import ConfigError, load_settings
from workers.celery_app import (
    AGENT_QUEUE,
    CALLBACKS_QUEUE,
    CLASSIFY_QUEUE,
    CONVERSATIONS_QUEUE,
    TASK_ROUTES,
    create_celery,
)


def settings(**overrides: object):
    return load_settings(environ={}, overrides=overrides)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (
            {"CELERY_VISIBILITY_TIMEOUT": 200, "HOOKLINE_RETRY_MAX_DELAY": 10},
            "outage retry backoff",
        ),
        (
            {"CELERY_VISIBILITY_TIMEOUT": 100, "HOOKLINE_RETRY_MAX_DELAY": 10},
            "task time limit",
        ),
        (
            {"CELERY_VISIBILITY_TIMEOUT": 1000, "HOOKLINE_RETRY_MAX_DELAY": 1000},
            "HOOKLINE_RETRY_MAX_DELAY",
        ),
    ],
)
def test_visibility_timeout_not_above_a_wait_is_refused(overrides, named) -> None:
    with pytest.raises(ConfigError, match="CELERY_VISIBILITY_TIMEOUT") as refused:
        create_celery(settings(**overrides))

    assert named in str(refused.value)


def test_rabbitmq_has_no_visibility_timeout_to_check() -> None:
    app = create_celery(
        settings(
            CELERY_BROKER_URL="amqp://guest:guest@127.0.0.1:5672//",
            CELERY_VISIBILITY_TIMEOUT=10,
        )
    )

    assert app.conf.broker_url.startswith("amqp://")


def test_every_task_is_routed_to_one_of_the_four_pools() -> None:
    app = create_celery(settings())
    queues = {queue.name for queue in app.conf.task_queues}

    assert queues == {CLASSIFY_QUEUE, CONVERSATIONS_QUEUE, AGENT_QUEUE, CALLBACKS_QUEUE}
    assert {route["queue"] for route in TASK_ROUTES.values()} <= queues
    assert app.conf.task_acks_late is True
    assert app.conf.task_reject_on_worker_lost is True
