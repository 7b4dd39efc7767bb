"""The Celery application, its queues and the routing of every task.

Each pool is a worker consuming one queue (see the Procfile). Scaling out means more
workers on the same broker.
"""

from __future__ import annotations

from celery import Celery, signals
from kombu import Exchange, Queue

from config.logging import delivery_id_var, setup_logging, task_id_var
from config.settings import ConfigError, Settings, load_settings

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

TASK_ROUTES = {
    CLASSIFY_TASK: {"queue": CLASSIFY_QUEUE},
    START_CONVERSATION_TASK: {"queue": CONVERSATIONS_QUEUE},
    RUN_AGENT_TASK: {"queue": AGENT_QUEUE},
    POST_CALLBACK_TASK: {"queue": CALLBACKS_QUEUE},
    SWEEP_TASK: {"queue": CONVERSATIONS_QUEUE},
    REDELIVER_TASK: {"queue": CONVERSATIONS_QUEUE},
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
        },
        imports=(
            "tasks.classify",
            "tasks.conversations",
            "tasks.agent",
            "tasks.callbacks",
            "tasks.redelivery",
        ),
    )
    if publisher:
        app.conf.update(PUBLISHER_OPTIONS)
    return app


app = create_celery(load_settings())


@signals.setup_logging.connect
def _configure_logging(**_: object) -> None:
    setup_logging(load_settings().LOG_LEVEL)


@signals.task_prerun.connect
def _bind_delivery(task_id: str, kwargs: dict | None = None, **_: object) -> None:
    delivery_id_var.set(str((kwargs or {}).get("delivery_id", "-")))
    task_id_var.set(task_id)


@signals.task_postrun.connect
def _unbind_delivery(**_: object) -> None:
    delivery_id_var.set("-")
    task_id_var.set("-")
