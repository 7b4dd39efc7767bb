"""The Celery application, its queues and the routing of every task.

Each pool is a worker consuming one queue (see the Procfile). Scaling out means more
workers on the same broker.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import TYPE_CHECKING

from celery import Celery, Task, signals
from celery.utils.nodenames import anon_nodename
from kombu import Exchange, Queue

from config.logging import (
    bind,
    delivery_id_var,
    setup_logging,
    task_id_var,
    unbind_all,
)
from config.settings import ConfigError, Settings, load_settings
from hookline import metrics

if TYPE_CHECKING:
    from celery.worker import WorkController

CLASSIFY_QUEUE = "classify"
CONVERSATIONS_QUEUE = "conversations"
AGENT_QUEUE = "agent"
CALLBACKS_QUEUE = "callbacks"

CLASSIFY_TASK = "hookline.classify_delivery"
START_CONVERSATION_TASK = "hookline.start_conversation"
RUN_AGENT_TASK = "hookline.run_agent"
POST_CALLBACK_TASK = "hookline.post_callback"
SWEEP_TASK = "hookline.requeue_stalled_work"
REDELIVER_TASK = "hookline.redeliver_failed_deliveries"
FLUSH_STATUS_EVENTS_TASK = "hookline.flush_status_events"
SWEEP_INBOX_TASK = "hookline.sweep_inbox"

TASK_ROUTES = {
    CLASSIFY_TASK: {"queue": CLASSIFY_QUEUE},
    START_CONVERSATION_TASK: {"queue": CONVERSATIONS_QUEUE},
    RUN_AGENT_TASK: {"queue": AGENT_QUEUE},
    POST_CALLBACK_TASK: {"queue": CALLBACKS_QUEUE},
    SWEEP_TASK: {"queue": CONVERSATIONS_QUEUE},
    REDELIVER_TASK: {"queue": CONVERSATIONS_QUEUE},
    FLUSH_STATUS_EVENTS_TASK: {"queue": CALLBACKS_QUEUE},
    SWEEP_INBOX_TASK: {"queue": CLASSIFY_QUEUE},
}


# Every task but the agent run talks to GitHub and the database a few times; one
# stuck for minutes is a bug or an attack, and must free its worker.
SHORT_TASK_SOFT_LIMIT = 90
SHORT_TASK_TIME_LIMIT = 120
# The longest wait between retries when the database, Redis or the broker is down.
OUTAGE_BACKOFF_MAX = 300


def check_broker_safety(settings: Settings) -> None:
    """Refuse settings under which the Redis broker would run a task twice."""
    if not settings.broker_url.startswith(("redis://", "rediss://", "unix://")):
        return
    # A task that runs, or waits on a retry countdown, stays unacknowledged in its
    # worker; past the visibility timeout Redis hands a copy to another worker.
    visibility = settings.CELERY_VISIBILITY_TIMEOUT
    holds = {
        "HOOKLINE_RETRY_MAX_DELAY": settings.HOOKLINE_RETRY_MAX_DELAY,
        "the task time limit": SHORT_TASK_TIME_LIMIT,
        "the outage retry backoff": OUTAGE_BACKOFF_MAX,
    }
    for name, seconds in holds.items():
        if seconds >= visibility:
            raise ConfigError(
                f"CELERY_VISIBILITY_TIMEOUT={visibility:g} s is not above {name} "
                f"({seconds:g} s): the Redis broker would deliver such a task twice."
            )


# GitHub waits 10 s for an answer: a publisher that cannot reach the broker must
# give up within a few seconds so the gateway can still answer 503.
PUBLISHER_OPTIONS = {
    "broker_connection_timeout": 2,
    "broker_connection_retry": False,
    "task_publish_retry_policy": {
        "max_retries": 1,
        "interval_start": 0,
        "interval_step": 0.2,
        "interval_max": 0.2,
    },
}


def create_celery(settings: Settings, publisher: bool = False) -> Celery:
    """Build a Celery app for `settings`; `publisher` for one that only publishes."""
    check_broker_safety(settings)
    transport_options: dict[str, object] = {
        "visibility_timeout": settings.CELERY_VISIBILITY_TIMEOUT
    }
    if publisher:
        transport_options |= {"socket_timeout": 2, "socket_connect_timeout": 2}
    if settings.CELERY_BROKER_KEYPREFIX:
        # Several deployments (or test runs) can then share one Redis database.
        transport_options["global_keyprefix"] = settings.CELERY_BROKER_KEYPREFIX
    app = Celery("hookline")
    app.conf.update(
        broker_url=settings.broker_url,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport_options,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_routes=TASK_ROUTES,
        task_queues=[
            Queue(name, Exchange(name, type="direct"), routing_key=name)
            for name in (
                CLASSIFY_QUEUE,
                CONVERSATIONS_QUEUE,
                AGENT_QUEUE,
                CALLBACKS_QUEUE,
            )
        ],
        task_default_queue=CLASSIFY_QUEUE,
        # Tasks are idempotent, so a message is acknowledged only once its work is
        # done; a worker killed mid-task leaves it to be delivered again.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=SHORT_TASK_SOFT_LIMIT,
        task_time_limit=SHORT_TASK_TIME_LIMIT,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=True,
        beat_schedule={
            "requeue-stalled-work": {"task": SWEEP_TASK, "schedule": 30.0},
            "redeliver-failed-deliveries": {"task": REDELIVER_TASK, "schedule": 300.0},
            "sweep-inbox": {"task": SWEEP_INBOX_TASK, "schedule": 60.0},
            **(
                {
                    "flush-status-events": {
                        "task": FLUSH_STATUS_EVENTS_TASK,
                        "schedule": settings.HOOKLINE_STATUS_WEBHOOK_BATCH_DELAY,
                        # A run left waiting for a whole interval is overtaken by
                        # the next; without this they pile up behind the callbacks.
                        "options": {
                            "expires": settings.HOOKLINE_STATUS_WEBHOOK_BATCH_DELAY
                        },
                    }
                }
                if settings.HOOKLINE_STATUS_WEBHOOK_URLS.split()
                else {}
            ),
        },
        imports=(
            "tasks.classify",
            "tasks.conversations",
            "tasks.agent",
            "tasks.callbacks",
            "tasks.redelivery",
            "tasks.status_webhooks",
        ),
    )
    if publisher:
        app.conf.update(PUBLISHER_OPTIONS)
    return app


class RedisTaskMessages:
    """Celery task messages exactly as kombu's Redis transport stores them.

    The gateway pushes a batch of classify tasks in one LPUSH on the Redis that
    holds its claims (webhook_gateway/intake.py), where publishing each through
    Celery took two more round trips and 0.75 ms of CPU. The message is Celery's
    own (protocol 2, built by `app.amqp`) in kombu's envelope: body JSON, base64.
    A task-sent event is not published; Flower sees the task from `received` on.
    """

    def __init__(self, app: Celery, settings: Settings) -> None:
        self._amqp = app.amqp
        self._prefix = settings.CELERY_BROKER_KEYPREFIX
        self._origin = anon_nodename()

    @staticmethod
    def applies_to(settings: Settings) -> bool:
        """Tell whether the broker is the very Redis database the claims live in."""
        return settings.broker_url == settings.REDIS_URL and (
            settings.broker_url.startswith(("redis://", "rediss://", "unix://"))
        )

    def queue_key(self, task: str) -> str:
        """Return the Redis list that holds `task`'s queue (priority 0)."""
        return self._prefix + TASK_ROUTES[task]["queue"]

    def build(self, task: str, kwargs: dict[str, str]) -> bytes:
        """Return a message for `task` with these keyword arguments."""
        task_id = str(uuid.uuid4())
        # What send_task shows in Flower, each argument cut to 1 KB, without
        # Celery's saferepr: it walks the text in Python, 50 us for 8 KB.
        limit = self._amqp.kwargsrepr_maxsize
        shown = repr({name: value[:limit] for name, value in kwargs.items()})
        headers, properties, body, _ = self._amqp.as_task_v2(
            task_id,
            task,
            args=(),
            kwargs=kwargs,
            argsrepr="()",
            kwargsrepr=shown if len(shown) <= limit else shown[: limit - 3] + "...",
            origin=self._origin,
            ignore_result=None,
        )
        properties.update(
            delivery_mode=2,
            delivery_info={"exchange": "", "routing_key": TASK_ROUTES[task]["queue"]},
            priority=0,
            body_encoding="base64",
            delivery_tag=str(uuid.uuid4()),
        )
        rest = json.dumps(
            {
                "content-encoding": "utf-8",
                "content-type": "application/json",
                "headers": headers,
                "properties": properties,
            }
        )[1:].encode()
        # Base64 needs no JSON escaping: spliced in, not scanned by the encoder.
        encoded = base64.b64encode(json.dumps(body).encode())
        return b'{"body": "' + encoded + b'", ' + rest


app = create_celery(load_settings())


@signals.setup_logging.connect
def _configure_logging(**_: object) -> None:
    setup_logging(load_settings().LOG_LEVEL, load_settings().LOG_FORMAT)


@signals.task_prerun.connect
def _bind_delivery(
    task_id: str, task: Task, kwargs: dict | None = None, **_: object
) -> None:
    kwargs = kwargs or {}
    delivery_id_var.set(str(kwargs.get("delivery_id", "-")))
    task_id_var.set(task_id)
    # The classifier gets the event itself; later tasks get it forwarded.
    event = kwargs.get("event") if task.name == CLASSIFY_TASK else None
    trigger = kwargs.get("trigger")
    installation = kwargs.get("installation")
    if installation is None and isinstance(trigger, dict):
        installation = trigger.get("installation_id")
    bind(event=kwargs.get("github_event") or event, installation=installation)


@signals.task_postrun.connect
def _unbind_delivery(**_: object) -> None:
    unbind_all()


def _queue_of(task: Task) -> str:
    route = TASK_ROUTES.get(task.name)
    return route["queue"] if route else task.app.conf.task_default_queue


@signals.task_prerun.connect
def _time_task(task_id: str, task: Task, **_: object) -> None:
    metrics.task_started(_queue_of(task), task.name, task_id)


@signals.task_postrun.connect
def _record_task_time(task_id: str, task: Task, **_: object) -> None:
    metrics.task_finished(_queue_of(task), task.name, task_id)


@signals.task_success.connect
def _count_success(sender: Task, **_: object) -> None:
    metrics.task_ended(_queue_of(sender), sender.name, "success")


# Sent in the child for an exception, in the main process for a time limit.
@signals.task_failure.connect
def _count_failure(sender: Task, **_: object) -> None:
    metrics.task_ended(_queue_of(sender), sender.name, "failure")


@signals.task_retry.connect
def _count_retry(sender: Task, reason: object = None, **_: object) -> None:
    # `reason` is Celery's Retry; the error that asked for it is its `exc`.
    metrics.task_retried(_queue_of(sender), sender.name, getattr(reason, "exc", None))


@signals.worker_init.connect
def _serve_pool_metrics(sender: WorkController, **_: object) -> None:
    """Empty the pool's metrics directory, create its series, open its port."""
    # Here, not at the top: only a worker needs the pool classes (billiard).
    from celery.concurrency import get_implementation
    from celery.concurrency.prefork import TaskPool as PreforkPool

    metrics.reset_multiprocess_dir()
    consumed = set(sender.app.amqp.queues.consume_from)
    metrics.prepare_tasks(
        {
            name: route["queue"]
            for name, route in TASK_ROUTES.items()
            if route["queue"] in consumed
        }
    )
    forks = issubclass(get_implementation(sender.pool_cls), PreforkPool)
    metrics.serve_worker_metrics(load_settings(), forks=forks)


@signals.worker_process_shutdown.connect
def _forget_pool_process(pid: int, **_: object) -> None:
    metrics.process_exited(pid)
