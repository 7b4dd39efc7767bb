"""Prometheus metrics read from the real processes, the way Prometheus scrapes them.

The gateway runs under gunicorn with two workers recycled every few requests, so
a scrape is right only if it adds up every worker's files, the exited ones' too.
A Celery pool with prefork children serves its own metrics port.
"""

from __future__ import annotations

import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families

from config.settings import load_settings
from hookline.devtools import free_port, send_delivery
from hookline.fake_github import FakeGitHub
from hookline.metrics import path_template
from tests.conftest import (
    BROKER_URL,
    REDIS_URL,
    SECRET,
    fixture_bytes,
    forget_keys,
    start_process,
    stop_processes,
    wait_until,
)
from webhook_gateway.app import EVENTS_PATH
from webhook_gateway.signature import sign
from workers.celery_app import CLASSIFY_TASK, create_celery

TOKEN = "test-metrics-token"
# A stale file a killed run could leave; unreadable, so a scrape fails on it.
STALE_FILE = "counter_4194303.db"
BODY = fixture_bytes("issue_comment.created.json")
PERMISSION_PATH = "/repos/{owner}/{repo}/collaborators/{username}/permission"


def scrape(url: str, token: str | None = TOKEN) -> dict[str, list]:
    """Return the samples of every metric family at `url`, by family name."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = requests.get(url, headers=headers, timeout=10)
    response.raise_for_status()
    return {
        family.name: family.samples
        for family in text_string_to_metric_families(response.text)
    }


def value(families: dict[str, list], sample: str, **labels: str) -> float:
    """Return the one sample named `sample` whose labels include `labels`."""
    found = [
        s.value
        for samples in families.values()
        for s in samples
        if s.name == sample and labels.items() <= s.labels.items()
    ]
    assert len(found) == 1, f"{sample} {labels}: {found}"
    return found[0]


def pids_in(directory: Path, pattern: str = "*.db") -> set[int]:
    """Return the processes that have metric files in `directory`."""
    return {int(path.stem.rpartition("_")[2]) for path in directory.glob(pattern)}


@dataclass
class Gateway:
    url: str
    master_pid: int
    directory: Path
    prefix: str


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, database_url: str
) -> Iterator[Gateway]:
    """Run gunicorn with two workers, each recycled after five requests."""
    prefix = f"hookline-metrics-{uuid.uuid4().hex[:8]}:"
    directory = tmp_path_factory.mktemp("web-metrics")
    (directory / STALE_FILE).write_bytes(b"left by a killed run")
    port = free_port()
    env = {
        "GITHUB_APP_WEBHOOK_SECRET": SECRET,
        # The broker is the claims' Redis, as by default: the claim queues the task.
        "REDIS_URL": REDIS_URL,
        "CELERY_BROKER_URL": REDIS_URL,
        "CELERY_BROKER_KEYPREFIX": prefix,
        "HOOKLINE_REDIS_PREFIX": prefix,
        "HOOKLINE_MAX_BODY_BYTES": "65536",
        "HOOKLINE_METRICS_TOKEN": TOKEN,
        # The inbox: an accepted delivery is stored before it is queued.
        "DATABASE_URL": database_url,
        "PROMETHEUS_MULTIPROC_DIR": str(directory),
        "WEB_CONCURRENCY": "2",
        "WEB_HOST": "127.0.0.1",
        "PORT": str(port),
        "LOG_FORMAT": "json",
    }
    gunicorn = Path(sys.executable).with_name("gunicorn")
    process = start_process(
        [
            *(str(gunicorn), "-c", "config/gunicorn.py", "--max-requests", "5"),
            "webhook_gateway.wsgi:app",
        ],
        env,
        tmp_path_factory.mktemp("web-log") / "web.log",
    )
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return requests.get(f"{url}/healthz", timeout=2).ok
        except requests.RequestException:
            # Refused until gunicorn listens, then slow while its workers boot.
            return False

    try:
        wait_until(answers, 30, "gunicorn answering")
        yield Gateway(url, process.pid, directory, prefix)
    finally:
        stop_processes(process)
        forget_keys(redis.Redis.from_url(REDIS_URL), prefix)


def post(gateway: Gateway, body: bytes, headers: dict[str, str]) -> int:
    """POST a raw request to the webhook route on a connection of its own."""
    response = requests.post(
        gateway.url + EVENTS_PATH, data=body, headers=headers, timeout=10
    )
    return response.status_code


def signed_headers(body: bytes, event: str | None = "issue_comment") -> dict:
    headers = {
        "Content-Type": "application/json",
        "X-GitHub-Delivery": str(uuid.uuid4()),
        "X-Hub-Signature-256": sign(SECRET.encode(), body),
    }
    if event is not None:
        headers["X-GitHub-Event"] = event
    return headers


def test_gateway_metrics_add_up_every_gunicorn_worker(gateway: Gateway) -> None:
    queue = redis.Redis.from_url(REDIS_URL)
    # The body hash is claimed too: each accepted delivery needs a body of its own.
    bodies = [BODY + b" " * index for index in range(4)]
    accepted = [
        send_delivery(gateway.url, SECRET, "issue_comment", body, str(uuid.uuid4()))
        for body in bodies
    ]
    ping = send_delivery(gateway.url, SECRET, "ping", fixture_bytes("ping.json"))
    first = scrape(gateway.url + "/metrics")

    assert [r.status_code for r in accepted] == [202] * 4
    assert ping.status_code == 200
    assert value(first, "hookline_deliveries_received_total") == 5
    assert value(first, "hookline_deliveries_accepted_total") == 4
    assert value(first, "hookline_deliveries_ping_total") == 1

    replays = [
        send_delivery(gateway.url, SECRET, "issue_comment", bodies[index], delivery)
        for index, delivery in enumerate(
            [accepted[0].json()["delivery"], accepted[1].json()["delivery"]]
        )
    ]
    forged = [
        send_delivery(gateway.url, "not-the-secret", "issue_comment", BODY)
        for _ in range(3)
    ]
    refused = {
        "bad_headers": post(gateway, BODY, signed_headers(BODY, event=None)),
        "malformed_payload": post(gateway, b"[1]", signed_headers(b"[1]")),
        "unsupported_content_type": post(
            gateway, BODY, {**signed_headers(BODY), "Content-Type": "text/plain"}
        ),
        "body_too_large": post(gateway, b"{}" * 40000, signed_headers(b"{}" * 40000)),
    }
    scrapes = [scrape(gateway.url + "/metrics") for _ in range(3)]

    assert [r.status_code for r in replays] == [200, 200]
    assert [r.json()["status"] for r in replays] == ["duplicate"] * 2
    assert [r.status_code for r in forged] == [403] * 3
    assert refused == {
        "bad_headers": 400,
        "malformed_payload": 400,
        "unsupported_content_type": 415,
        "body_too_large": 413,
    }
    for families in scrapes:
        assert value(families, "hookline_deliveries_received_total") == 14
        assert value(families, "hookline_deliveries_accepted_total") == 4
        assert value(families, "hookline_deliveries_duplicate_total") == 2
        assert value(families, "hookline_deliveries_ping_total") == 1
        rejected = {
            s.labels["reason"]: s.value
            for s in families["hookline_deliveries_rejected"]
        }
        assert rejected == {
            "webhooks_disabled": 0,
            "body_too_large": 1,
            "bad_signature": 3,
            "bad_headers": 1,
            "unsupported_content_type": 1,
            "malformed_payload": 1,
            "dedup_unavailable": 0,
            "inbox_unavailable": 0,
            "queue_unavailable": 0,
            "source_not_allowed": 0,
            "rate_limited": 0,
        }
        latency = "hookline_gateway_request_duration_seconds"
        assert value(families, f"{latency}_count") == 14
        assert value(families, f"{latency}_bucket", le="+Inf") == 14
        assert value(families, f"{latency}_sum") > 0
        depth = queue.llen(f"{gateway.prefix}classify")
        assert depth == 4
        assert value(families, "hookline_queue_depth", queue="classify") == depth
        assert value(families, "hookline_queue_depth", queue="agent") == 0

    # Recycled after five requests each: the sums above took in exited workers.
    workers = pids_in(gateway.directory, "counter_*.db") - {gateway.master_pid}
    assert len(workers) >= 3
    assert not (gateway.directory / STALE_FILE).exists()


def test_gateway_metrics_need_the_token_when_one_is_set(gateway: Gateway) -> None:
    url = gateway.url + "/metrics"
    missing = requests.get(url, timeout=10)
    wrong = requests.get(url, headers={"Authorization": "Bearer nope"}, timeout=10)
    basic = requests.get(url, headers={"Authorization": f"Basic {TOKEN}"}, timeout=10)
    right = requests.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)

    assert [missing.status_code, wrong.status_code, basic.status_code] == [401] * 3
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert missing.json()["reason"] == "unauthorized"
    assert right.status_code == 200
    assert right.headers["Cache-Control"] == "no-store"
    assert "hookline_deliveries_received_total" in right.text


@pytest.fixture
def pool_env(environment: dict[str, str], tmp_path: Path) -> Iterator[dict[str, str]]:
    """Return a classify pool's settings, with a broker prefix no other run reads."""
    prefix = f"hookline-metrics-{uuid.uuid4().hex[:8]}:"
    env = {
        **environment,
        "CELERY_BROKER_KEYPREFIX": prefix,
        "HOOKLINE_REDIS_PREFIX": prefix,
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "pool-metrics"),
        "HOOKLINE_WORKER_METRICS_PORT": str(free_port()),
        "HOOKLINE_WORKER_METRICS_HOST": "127.0.0.1",
        "HOOKLINE_METRICS_TOKEN": TOKEN,
    }
    yield env
    for url in (BROKER_URL, REDIS_URL):
        forget_keys(redis.Redis.from_url(url), prefix)


def test_prefork_pool_serves_task_outcomes_on_its_port(
    pool_env: dict[str, str], fake_github: FakeGitHub, tmp_path: Path
) -> None:
    directory = Path(pool_env["PROMETHEUS_MULTIPROC_DIR"])
    directory.mkdir()
    (directory / STALE_FILE).write_bytes(b"left by a killed run")
    fake_github.reset()
    # The first permission check fails the way GitHub does under load: one retry.
    fake_github.fail_next("GET", r"/collaborators/[^/]+/permission$", 502)
    log = tmp_path / "classify.log"
    worker = start_process(
        [
            *(sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker"),
            *("-Q", "classify", "-n", f"metrics-{uuid.uuid4().hex[:6]}@test"),
            *("--pool", "prefork", "--concurrency", "2"),
            *("--without-gossip", "--without-mingle", "-l", "INFO"),
        ],
        pool_env,
        log,
    )
    url = f"http://127.0.0.1:{pool_env['HOOKLINE_WORKER_METRICS_PORT']}/metrics"
    try:
        wait_until(lambda: "ready." in log.read_text(), 60, "the pool starting")
        publisher = create_celery(load_settings(pool_env), publisher=True)
        publisher.send_task(
            CLASSIFY_TASK,
            kwargs={
                "delivery_id": str(uuid.uuid4()),
                "event": "issue_comment",
                "body": BODY.decode(),
            },
        )
        # Arguments the task does not take: a failure before its body runs.
        publisher.send_task(CLASSIFY_TASK, kwargs={"delivery_id": "no-body"})

        def runs() -> float:
            families = scrape(url)
            return value(
                families,
                "hookline_task_duration_seconds_count",
                queue="classify",
                task=CLASSIFY_TASK,
            )

        wait_until(lambda: runs() == 3, 60, "three classify runs")
        families = scrape(url)
    finally:
        stop_processes(worker)

    def tasks(outcome: str) -> float:
        return value(
            families,
            "hookline_tasks_total",
            queue="classify",
            task=CLASSIFY_TASK,
            outcome=outcome,
        )

    assert (tasks("success"), tasks("retry"), tasks("failure")) == (1, 1, 1)
    assert (
        value(
            families,
            "hookline_task_retries_total",
            task=CLASSIFY_TASK,
            error="TransientGitHubError",
        )
        == 1
    )
    assert value(families, "hookline_tasks_in_progress", task=CLASSIFY_TASK) == 0
    called = Counter(
        (call.method, path_template(call.path), str(call.status))
        for call in fake_github.requests()
    )
    counted = {
        (s.labels["method"], s.labels["path"], s.labels["status"]): s.value
        for s in families["hookline_github_calls"]
        if s.name == "hookline_github_calls_total" and s.value
    }
    assert counted == called
    assert counted[("GET", PERMISSION_PATH, "502")] == 1

    assert not (directory / STALE_FILE).exists()
    # Each child marked itself dead as it exited: no live gauge of theirs is left.
    children = pids_in(directory, "counter_*.db") - {worker.pid}
    assert children
    assert not children & pids_in(directory, "gauge_live*.db")


def test_pool_port_refuses_a_scrape_without_the_token(
    pool_env: dict[str, str], tmp_path: Path
) -> None:
    log = tmp_path / "classify.log"
    worker = start_process(
        [
            *(sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker"),
            *("-Q", "classify", "-n", f"metrics-{uuid.uuid4().hex[:6]}@test"),
            *("--pool", "threads", "--concurrency", "2"),
            *("--without-gossip", "--without-mingle", "-l", "INFO"),
        ],
        {
            name: setting
            for name, setting in pool_env.items()
            if name != "PROMETHEUS_MULTIPROC_DIR"
        },
        log,
    )
    url = f"http://127.0.0.1:{pool_env['HOOKLINE_WORKER_METRICS_PORT']}/metrics"
    try:
        wait_until(lambda: "ready." in log.read_text(), 60, "the pool starting")
        refused = requests.get(url, timeout=10)
        families = scrape(url)
    finally:
        stop_processes(worker)

    assert refused.status_code == 401
    # A thread pool runs its tasks in the one process: no directory needed.
    assert (
        value(
            families,
            "hookline_tasks_total",
            queue="classify",
            task=CLASSIFY_TASK,
            outcome="success",
        )
        == 0
    )
