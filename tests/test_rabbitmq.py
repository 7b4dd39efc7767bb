"""The same pipeline with RabbitMQ as the broker instead of Redis."""

from __future__ import annotations

import socket

import pytest

from config.settings import load_settings
from tests.conftest import POOLS, Stack, launched
from workers.celery_app import create_celery

RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"


def rabbitmq_answers() -> bool:
    with socket.socket() as probe:
        probe.settimeout(2)
        return probe.connect_ex(("127.0.0.1", 5672)) == 0


def test_labeled_issue_is_answered_through_rabbitmq(
    environment: dict[str, str],
    running: Stack,
    tmp_path,
) -> None:
    if not rabbitmq_answers():
        pytest.fail("RabbitMQ is not answering on 127.0.0.1:5672 (.ci/run starts it)")
    fake_github = running.fake
    env = {**environment, "CELERY_BROKER_URL": RABBITMQ_URL}
    # Queues on RabbitMQ outlive a run; drop what an interrupted one left behind.
    create_celery(load_settings(env)).control.purge()
    # One worker for every queue: a small deployment on one machine.
    with launched(env, fake_github, tmp_path, {"all": ",".join(POOLS)}) as rabbit:
        _, status = rabbit.send("issues.labeled.json", "issues")

        assert status == 202
        assert fake_github.wait_for(
            lambda fake: any("finished" in c["body"] for c in fake.comments()),
            timeout=30,
        )
        # The rocket follows the edit: wait for it before the workers stop.
        assert fake_github.wait_for(lambda fake: len(fake.reactions()) == 2, timeout=10)
    (comment,) = fake_github.comments()
    assert comment["path"] == "/repos/octo-user/Hello-World/issues/1/comments"
    assert "test agent finished octo-user/Hello-World#1 (issue)" in comment["body"]
    assert [r["content"] for r in fake_github.reactions()] == ["eyes", "rocket"]
