"""The pipeline's ceiling: four no-op tasks on four queues, chained like the pools.

The app is Hookline's own Celery configuration (workers.celery_app.create_celery:
the same broker, transport options, acks, prefetch and events), with only the
task modules and the queues swapped. Each hop queues the next; the last records
its chain in Redis, so lost and duplicated chains can be counted.
"""

from __future__ import annotations

import time
from functools import cache

import redis
from celery import Celery
from kombu import Exchange, Queue

from config.settings import Settings, load_settings
from workers.celery_app import create_celery

HOPS = 4
QUEUES = [f"bench_noop_{hop}" for hop in range(1, HOPS + 1)]
TASKS = [f"bench.noop_{hop}" for hop in range(1, HOPS + 1)]
DONE_COUNT = "bench:noop:done"
DONE_AT = "bench:noop:finished-at"


def make_app(settings: Settings, publisher: bool = False) -> Celery:
    """Return Hookline's Celery app for `settings`, routing the no-op queues."""
    noop = create_celery(settings, publisher=publisher)
    noop.conf.update(
        imports=(),
        beat_schedule={},
        task_routes={
            task: {"queue": queue} for task, queue in zip(TASKS, QUEUES, strict=True)
        },
        task_queues=[
            Queue(name, Exchange(name, type="direct"), routing_key=name)
            for name in QUEUES
        ],
        task_default_queue=QUEUES[0],
    )
    return noop


app = make_app(load_settings())


@cache
def _redis() -> redis.Redis:
    return redis.Redis.from_url(load_settings().REDIS_URL)


def start_chain(publisher: Celery, chain_id: str, body: str) -> None:
    """Queue the first hop, carrying a body as the gateway's message does."""
    publisher.send_task(
        TASKS[0], kwargs={"delivery_id": chain_id, "event": "bench", "body": body}
    )


@app.task(name=TASKS[0])
def noop_1(delivery_id: str, event: str, body: str) -> None:
    """Hop 1 of 4: queue hop 2."""
    app.send_task(TASKS[1], kwargs={"delivery_id": delivery_id})


@app.task(name=TASKS[1])
def noop_2(delivery_id: str) -> None:
    """Hop 2 of 4: queue hop 3."""
    app.send_task(TASKS[2], kwargs={"delivery_id": delivery_id})


# Acknowledged on receipt, as the agent pool's task is.
@app.task(name=TASKS[2], acks_late=False)
def noop_3(delivery_id: str) -> None:
    """Hop 3 of 4: queue hop 4."""
    app.send_task(TASKS[3], kwargs={"delivery_id": delivery_id})


@app.task(name=TASKS[3])
def noop_4(delivery_id: str) -> None:
    """Hop 4 of 4: count the chain and note when it ended (monotonic clock)."""
    pipe = _redis().pipeline(transaction=False)
    pipe.incr(DONE_COUNT)
    pipe.zadd(DONE_AT, {delivery_id: time.monotonic()})
    pipe.execute()
