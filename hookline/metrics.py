"""Prometheus metrics: what the gateway and the pools count, and how it is served.

Each process updates the module-level metrics below. With PROMETHEUS_MULTIPROC_DIR
set (gunicorn's workers, a prefork pool's children) every process writes its
values to files of its own in that directory and a scrape adds the files up;
without it the values stay in the process and a scrape reads them there. Either
way an update is a few microseconds and does not raise.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import redis
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_wsgi_app,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from config.settings import Settings

log = logging.getLogger(__name__)

MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> Path | None:
    """Return the directory shared by this process tree's metrics, if there is one."""
    path = os.environ.get(MULTIPROC_DIR_VARIABLE)
    return Path(path) if path else None


# In multiprocess mode a metric without labels opens its file as it is defined
# below: the directory has to exist first (beat, the CLI and Flower import this
# module too, and nothing else creates it there).
if (_directory := multiprocess_dir()) is not None:
    _directory.mkdir(parents=True, exist_ok=True)


# The gateway: one series per way a delivery can end.

DELIVERIES_RECEIVED = Counter(
    "hookline_deliveries_received",
    "Requests to the webhook route, whatever their answer.",
)
DELIVERIES_ACCEPTED = Counter(
    "hookline_deliveries_accepted",
    "Deliveries verified, claimed and queued for classification (202).",
)
DELIVERIES_DUPLICATE = Counter(
    "hookline_deliveries_duplicate",
    "Deliveries answered 200 duplicate: their id or body was seen before.",
)
DELIVERIES_PING = Counter(
    "hookline_deliveries_ping",
    "GitHub ping events, answered 200 pong.",
)
DELIVERIES_REJECTED = Counter(
    "hookline_deliveries_rejected",
    "Deliveries refused, by the machine-readable reason of the answer.",
    ["reason"],
)
GATEWAY_BATCH_SIZE = Histogram(
    "hookline_gateway_batch_size",
    "Deliveries one gateway process claimed, stored and queued together.",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
GATEWAY_REQUEST_SECONDS = Histogram(
    "hookline_gateway_request_duration_seconds",
    "Time the gateway took to answer a request to the webhook route.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

# Every `reason` the gateway answers with (webhook_gateway/app.py), created up
# front so that each series exists, at 0, from the first scrape.
REJECTION_REASONS = (
    "webhooks_disabled",
    "body_too_large",
    "bad_signature",
    "bad_headers",
    "unsupported_content_type",
    "malformed_payload",
    "dedup_unavailable",
    "inbox_unavailable",
    "queue_unavailable",
    "source_not_allowed",
    "rate_limited",
)
_rejected = {reason: DELIVERIES_REJECTED.labels(reason) for reason in REJECTION_REASONS}


def delivery_rejected(reason: str) -> None:
    """Count one refused delivery under its answer's `reason`."""
    counter = _rejected.get(reason)
    if counter is None:
        counter = _rejected.setdefault(reason, DELIVERIES_REJECTED.labels(reason))
    counter.inc()


# The pools.

TASKS = Counter(
    "hookline_tasks",
    "Task runs by how they ended: success, failure or retry.",
    ["queue", "task", "outcome"],
)
TASK_RETRIES = Counter(
    "hookline_task_retries",
    "Retries a task scheduled, by the type of the error that caused them.",
    ["queue", "task", "error"],
)
TASK_SECONDS = Histogram(
    "hookline_task_duration_seconds",
    "Time one run of a task took, whatever its outcome.",
    ["queue", "task"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
)
TASKS_IN_PROGRESS = Gauge(
    "hookline_tasks_in_progress",
    "Tasks running right now, over the pool's live processes.",
    ["queue", "task"],
    # Summed over live processes; a process's share goes when it is marked dead.
    multiprocess_mode="livesum",
)
TASK_OUTCOMES = ("success", "failure", "retry")

# When each running task started, by task id and thread (a thread pool runs
# several at once; a redelivered message can run beside its first copy). A stack:
# an eager retry runs the task again inside its own run.
_task_started: dict[tuple[str, int], list[float]] = {}


def prepare_tasks(queues_by_task: Mapping[str, str]) -> None:
    """Create every series of these tasks at 0, so that rate() sees the first run."""
    for task, queue in queues_by_task.items():
        for outcome in TASK_OUTCOMES:
            TASKS.labels(queue, task, outcome)
        TASK_SECONDS.labels(queue, task)
        TASKS_IN_PROGRESS.labels(queue, task)


def task_started(queue: str, task: str, task_id: str) -> None:
    """Note that a run of `task` began in this thread."""
    key = (task_id, threading.get_ident())
    _task_started.setdefault(key, []).append(time.perf_counter())
    TASKS_IN_PROGRESS.labels(queue, task).inc()


def task_finished(queue: str, task: str, task_id: str) -> None:
    """Record how long the run begun by task_started() in this thread took."""
    key = (task_id, threading.get_ident())
    starts = _task_started.get(key)
    if not starts:
        return
    started = starts.pop()
    if not starts:
        del _task_started[key]
    TASKS_IN_PROGRESS.labels(queue, task).dec()
    TASK_SECONDS.labels(queue, task).observe(time.perf_counter() - started)


def task_ended(queue: str, task: str, outcome: str) -> None:
    """Count a run that ended in success or failure."""
    TASKS.labels(queue, task, outcome).inc()


def task_retried(queue: str, task: str, error: BaseException | None) -> None:
    """Count a run that scheduled a retry, and the type of error behind it."""
    TASKS.labels(queue, task, "retry").inc()
    error_type = type(error).__name__ if error is not None else "none"
    TASK_RETRIES.labels(queue, task, error_type).inc()


# GitHub's API.

GITHUB_CALLS = Counter(
    "hookline_github_calls",
    "Calls to GitHub's API by method, path template and status (error: no answer).",
    ["method", "path", "status"],
)

# Resource names in the REST paths Hookline calls, and their near neighbours. Any
# other segment becomes a placeholder, so the `path` label only ever holds these
# words and placeholders: its values are bounded whatever ids and names come by.
_RESOURCES = frozenset(
    {
        "api",
        "v3",
        "app",
        "hook",
        "deliveries",
        "attempts",
        "installation",
        "installations",
        "access_tokens",
        "repositories",
        "repos",
        "issues",
        "pulls",
        "comments",
        "replies",
        "reactions",
        "reviews",
        "labels",
        "events",
        "timeline",
        "collaborators",
        "permission",
        "users",
        "orgs",
        "commits",
        "statuses",
        "check-runs",
        "rate_limit",
    }
)
# What an id after each resource name stands for.
_PLACEHOLDERS = {
    "issues": "{number}",
    "pulls": "{number}",
    "comments": "{comment_id}",
    "reactions": "{reaction_id}",
    "deliveries": "{delivery_id}",
    "installations": "{installation_id}",
    "collaborators": "{username}",
    "users": "{username}",
    "orgs": "{org}",
    "reviews": "{review_id}",
    "labels": "{name}",
    "commits": "{sha}",
    "statuses": "{sha}",
}
# After these the next segment is a name even when it spells a resource.
_NAMED_BY_NEXT = frozenset({"collaborators", "users", "orgs"})
_MAX_SEGMENTS = 8


def path_template(path: str) -> str:
    """Return `path` with owners, names and ids replaced by placeholders.

    `/repos/a/b/issues/12/comments` becomes `/repos/{owner}/{repo}/issues/{number}/
    comments`; the query string is dropped and paths are cut after eight segments.
    """
    segments = [part for part in path.partition("?")[0].split("/") if part]
    template: list[str] = []
    previous = ""
    for segment in segments[:_MAX_SEGMENTS]:
        if previous == "repos":
            template += ["{owner}"]
            previous = "{owner}"
            continue
        if previous == "{owner}":
            template += ["{repo}"]
            previous = "{repo}"
            continue
        if previous in _NAMED_BY_NEXT or segment not in _RESOURCES:
            template += [_PLACEHOLDERS.get(previous, "{id}")]
            previous = ""
            continue
        template += [segment]
        previous = segment
    if len(segments) > _MAX_SEGMENTS:
        template += ["{rest}"]
    return "/" + "/".join(template)


def github_call(method: str, url: str, status: int | None) -> None:
    """Count one call to GitHub; `status` is None when no response came back."""
    path = url.split("://", 1)[-1].partition("/")[2]
    GITHUB_CALLS.labels(
        method.upper(),
        path_template(path),
        "error" if status is None else str(status),
    ).inc()


# Queue depths, asked of the broker at scrape time.

# Celery's Redis transport keeps a queue's messages of each priority step in a
# list of its own (kombu's default steps 0, 3, 6 and 9; step 0 has the bare name).
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


class QueueDepthCollector:
    """Report how many messages wait in each queue of a Redis broker."""

    def __init__(self, client: redis.Redis, key_prefix: str, queues: Iterable[str]):
        self._client = client
        self._prefix = key_prefix
        self._queues = tuple(queues)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield the queue depths, or nothing when the broker does not answer."""
        pipe = self._client.pipeline(transaction=False)
        for queue in self._queues:
            for suffix in _PRIORITY_SUFFIXES:
                pipe.llen(self._prefix + queue + suffix)
        try:
            lengths = pipe.execute()
        except redis.RedisError as exc:
            log.warning(
                "metrics.queue_depth_unavailable", extra={"error": type(exc).__name__}
            )
            return
        family = GaugeMetricFamily(
            "hookline_queue_depth",
            "Messages waiting in each broker queue, read when scraped.",
            labels=["queue"],
        )
        steps = len(_PRIORITY_SUFFIXES)
        for index, queue in enumerate(self._queues):
            waiting = lengths[index * steps : (index + 1) * steps]
            family.add_metric([queue], sum(waiting))
        yield family


def queue_depths(
    settings: Settings, queues: Iterable[str]
) -> QueueDepthCollector | None:
    """Return a collector of `queues`' depths, or None when the broker is not Redis."""
    if not settings.broker_url.startswith(("redis://", "rediss://", "unix://")):
        return None
    client = redis.Redis.from_url(
        settings.broker_url, socket_timeout=1, socket_connect_timeout=1
    )
    return QueueDepthCollector(client, settings.CELERY_BROKER_KEYPREFIX, queues)


# Scraping.


def scrape_registry(*collectors: Collector) -> CollectorRegistry:
    """Return a registry of every process's metrics in this tree, plus `collectors`.

    Built once per server: the multiprocess collector reads the files at each
    scrape, so nothing is cached between scrapes.
    """
    registry = CollectorRegistry()
    path = multiprocess_dir()
    if path is None:
        registry.register(REGISTRY)
    else:
        # TODO: exited processes' files stay until the next start, since their
        # counts must; children recycled often make every scrape read more files.
        MultiProcessCollector(registry, str(path))
    for collector in collectors:
        registry.register(collector)
    return registry


def exposition(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """Return the registry in the format the scraper accepts, and its content type."""
    try:
        encoder, content_type = choose_encoder(accept or "")
    except (TypeError, ValueError):
        # prometheus_client chokes on some malformed Accept headers (a version
        # that is not a number): the plain text format serves everyone.
        encoder, content_type = choose_encoder("")
    return encoder(registry), content_type


def authorized(token: str, authorization: str | None) -> bool:
    """Tell whether a scrape may read metrics: open when `token` is empty."""
    if not token:
        return True
    scheme, _, credentials = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        credentials.strip().encode(), token.encode()
    )


# The multiprocess directory's life cycle.


def _pid_of(file: Path) -> int | None:
    suffix = file.stem.rpartition("_")[2]
    return int(suffix) if suffix.isdigit() else None


def reset_multiprocess_dir() -> Path | None:
    """Delete the files earlier processes left in the directory; return the directory.

    Called by a pool's main process before it forks. Its own files stay: it
    opened them as it imported this module, and they hold only zeros so far.
    """
    path = multiprocess_dir()
    if path is None:
        return None
    path.mkdir(parents=True, exist_ok=True)
    own = os.getpid()
    for file in path.glob("*.db"):
        if _pid_of(file) != own:
            file.unlink(missing_ok=True)
    log.info("metrics.directory_reset", extra={"path": str(path)})
    return path


def process_exited(pid: int) -> None:
    """Drop an exited process's share of the live gauges (its counters stay)."""
    path = multiprocess_dir()
    if path is not None:
        mark_process_dead(pid, str(path))


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def forget_dead_processes(path: Path) -> None:
    """Mark dead every process whose live gauges remain though it is gone."""
    # A prefork child killed outright (hard time limit, OOM) never sends
    # worker_process_shutdown: without this its running tasks would stay counted.
    pids = {_pid_of(file) for file in path.glob("gauge_live*_*.db")}
    for pid in pids - {None, os.getpid()}:
        if pid is not None and not _is_alive(pid):
            mark_process_dead(pid, str(path))


# A pool's own metrics port.


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *_: Any) -> None:
        """Leave scrapes out of the worker's log."""


def _metrics_app(
    registry: CollectorRegistry, token: str, path: Path | None
) -> WSGIApplication:
    serve = make_wsgi_app(registry)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if not authorized(token, environ.get("HTTP_AUTHORIZATION")):
            log.warning("metrics.unauthorized")
            start_response(
                "401 Unauthorized",
                [
                    ("Content-Type", "text/plain; charset=utf-8"),
                    ("WWW-Authenticate", 'Bearer realm="metrics"'),
                ],
            )
            return [b"Send Authorization: Bearer <HOOKLINE_METRICS_TOKEN>.\n"]
        if path is not None:
            forget_dead_processes(path)
        return serve(environ, start_response)

    return app


def serve_worker_metrics(settings: Settings, forks: bool) -> WSGIServer | None:
    """Serve this pool's metrics on HOOKLINE_WORKER_METRICS_PORT, in a thread.

    For the pool's main process only. `forks` says that tasks run in child
    processes, whose counts only PROMETHEUS_MULTIPROC_DIR can bring here.
    """
    port = settings.HOOKLINE_WORKER_METRICS_PORT
    if not port:
        return None
    path = multiprocess_dir()
    if forks and path is None:
        # Served from this process alone the counts would read 0: refuse, loudly.
        log.error(
            "metrics.port_refused",
            extra={"reason": f"a prefork pool needs {MULTIPROC_DIR_VARIABLE}"},
        )
        return None

    app = _metrics_app(scrape_registry(), settings.HOOKLINE_METRICS_TOKEN, path)
    host = settings.HOOKLINE_WORKER_METRICS_HOST
    try:
        server = make_server(
            host, port, app, server_class=_ThreadingServer, handler_class=_QuietHandler
        )
    except OSError as exc:
        # Metrics are not worth a pool that does not start.
        log.error("metrics.port_unavailable", extra={"port": port, "error": str(exc)})
        return None
    thread = threading.Thread(
        target=server.serve_forever, name="metrics-server", daemon=True
    )
    thread.start()
    log.info("metrics.serving", extra={"host": host, "port": port})
    return server
