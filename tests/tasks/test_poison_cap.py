"""A task whose workers keep dying under it is stopped after a few starts."""

from __future__ import annotations

import uuid

from tasks.common import MAX_STARTS_PER_ATTEMPT, may_start


def test_attempt_refused_after_its_workers_died_too_often(redis_client) -> None:
    task_id = str(uuid.uuid4())

    starts = [may_start(redis_client, task_id, 0) for _ in range(4)]

    assert starts == [True] * MAX_STARTS_PER_ATTEMPT + [False]


def test_each_retry_is_counted_on_its_own(redis_client) -> None:
    task_id = str(uuid.uuid4())
    for _ in range(MAX_STARTS_PER_ATTEMPT):
        may_start(redis_client, task_id, 0)

    assert may_start(redis_client, task_id, 1) is True


def test_without_redis_the_task_still_runs() -> None:
    import redis

    unreachable = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_timeout=1)

    assert may_start(unreachable, str(uuid.uuid4()), 0) is True
