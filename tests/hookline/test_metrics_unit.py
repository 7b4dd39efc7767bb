"""The metrics in one process: path templates, the token, task signals, the pool port.

Without PROMETHEUS_MULTIPROC_DIR every metric lives in this process's default
registry; a test reads a value before and after, since other tests count too.
"""

from __future__ import annotations

import os
import random
import string
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests
from celery import Celery, Task
from prometheus_client import REGISTRY

import workers.celery_app  # noqa: F401  (connects the task signal handlers)
from config.settings import load_settings
from hookline import metrics
from hookline.devtools import free_port
from tests.webhook_gateway.conftest import gateway
from tests.webhook_gateway.test_app import post


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize(
    ("path", "template"),
    [
        (
            "/repos/a/b/issues/12/comments",
            "/repos/{owner}/{repo}/issues/{number}/comments",
        ),
        ("/repos/a/b/issues/12", "/repos/{owner}/{repo}/issues/{number}"),
        ("/repos/a/b/pulls/7", "/repos/{owner}/{repo}/pulls/{number}"),
        (
            "/repos/octo-org/hello.world/issues/comments/901/reactions",
            "/repos/{owner}/{repo}/issues/comments/{comment_id}/reactions",
        ),
        (
            "/repos/a/b/pulls/3/comments/44/replies",
            "/repos/{owner}/{repo}/pulls/{number}/comments/{comment_id}/replies",
        ),
        (
            "/repos/a/b/collaborators/octocat/permission",
            "/repos/{owner}/{repo}/collaborators/{username}/permission",
        ),
        (
            "/app/installations/31337/access_tokens",
            "/app/installations/{installation_id}/access_tokens",
        ),
        (
            "/app/hook/deliveries/12345/attempts",
            "/app/hook/deliveries/{delivery_id}/attempts",
        ),
        ("/app/hook/deliveries?per_page=100&cursor=x", "/app/hook/deliveries"),
        # GitHub Enterprise serves the API under /api/v3.
        (
            "/api/v3/repos/a/b/issues/1/comments",
            "/api/v3/repos/{owner}/{repo}/issues/{number}/comments",
        ),
        # Names that spell resources are still names where a name belongs.
        (
            "/repos/issues/comments/collaborators/permission/permission",
            "/repos/{owner}/{repo}/collaborators/{username}/permission",
        ),
        ("/", "/"),
    ],
)
def test_path_template_replaces_owners_names_and_ids(path: str, template: str):
    assert metrics.path_template(path) == template


def test_path_template_values_stay_bounded_whatever_the_paths() -> None:
    generator = random.Random(7)

    def word() -> str:
        alphabet = string.ascii_letters + string.digits + "-._~%"
        return "".join(generator.choices(alphabet, k=generator.randint(1, 12)))

    known = [
        "/repos/{}/{}/issues/{}/comments",
        "/repos/{}/{}/pulls/{}/comments/{}/replies",
        "/repos/{}/{}/collaborators/{}/permission",
    ]
    shapes = {
        metrics.path_template(generator.choice(known).format(*(word() for _ in "xyzw")))
        for _ in range(2000)
    }
    anything = {
        metrics.path_template("/".join(word() for _ in range(generator.randint(0, 20))))
        for _ in range(2000)
    }

    assert len(shapes) == len(known)
    placeholders = set(metrics._PLACEHOLDERS.values()) | {
        "{id}",
        "{owner}",
        "{repo}",
        "{rest}",
    }
    for template in shapes | anything:
        segments = [part for part in template.split("/") if part]
        assert len(segments) <= 9
        assert set(segments) <= metrics._RESOURCES | placeholders


def test_a_github_call_without_an_answer_is_counted_as_an_error() -> None:
    path = "/app/installations/{installation_id}/access_tokens"
    labels = {"method": "POST", "path": path}
    before = sample("hookline_github_calls_total", **labels, status="error")

    url = "http://127.0.0.1:9/app/installations/9/access_tokens"
    metrics.github_call("post", url, None)

    assert sample("hookline_github_calls_total", **labels, status="error") == (
        before + 1
    )


@pytest.mark.parametrize(
    ("token", "authorization", "allowed"),
    [
        ("", None, True),
        ("", "Bearer anything", True),
        ("s3cret", None, False),
        ("s3cret", "Bearer s3cret", True),
        ("s3cret", "bearer s3cret", True),
        ("s3cret", "Bearer s3cre", False),
        ("s3cret", "Basic s3cret", False),
        ("s3cret", "s3cret", False),
    ],
)
def test_metrics_token(token: str, authorization: str | None, allowed: bool) -> None:
    assert metrics.authorized(token, authorization) is allowed


def test_gateway_counts_in_process_without_a_multiprocess_dir(
    redis_client: redis.Redis,
) -> None:
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    client = gateway()
    before = sample("hookline_deliveries_rejected_total", reason="bad_signature")
    received = sample("hookline_deliveries_received_total")

    response = post(client, signature="sha256=" + "0" * 64)
    scraped = client.get("/metrics")

    assert response.status_code == 403
    assert scraped.status_code == 200
    assert sample("hookline_deliveries_rejected_total", reason="bad_signature") == (
        before + 1
    )
    assert sample("hookline_deliveries_received_total") == received + 1
    assert 'hookline_queue_depth{queue="classify"}' in scraped.text


def test_gateway_metrics_token_setting(redis_client: redis.Redis) -> None:
    client = gateway(HOOKLINE_METRICS_TOKEN="s3cret")

    refused = client.get("/metrics")
    allowed = client.get("/metrics", headers={"Authorization": "Bearer s3cret"})

    assert refused.status_code == 401
    assert refused.json["reason"] == "unauthorized"
    assert allowed.status_code == 200


def test_queue_depths_are_left_out_when_the_broker_does_not_answer() -> None:
    client = redis.Redis(port=free_port(), socket_connect_timeout=0.5)
    collector = metrics.QueueDepthCollector(client, "p:", ["classify"])

    assert list(collector.collect()) == []


def test_no_queue_depths_for_a_broker_other_than_redis() -> None:
    settings = load_settings(
        environ={}, overrides={"CELERY_BROKER_URL": "amqp://guest@127.0.0.1//"}
    )

    assert metrics.queue_depths(settings, ["classify"]) is None


@pytest.fixture
def eager_app() -> Celery:
    app = Celery("metrics-unit")
    app.conf.update(task_always_eager=True, task_default_queue="unit")
    return app


def test_task_signals_count_outcomes_retries_and_durations(eager_app: Celery):
    name = f"tests.flaky-{uuid.uuid4().hex[:6]}"

    @eager_app.task(name=name, bind=True, max_retries=1)
    def flaky(self: Task) -> str:
        if self.request.retries == 0:
            raise self.retry(exc=ConnectionResetError("first try"), countdown=0)
        return "done"

    @eager_app.task(name=f"{name}-broken")
    def broken() -> None:
        raise ValueError("always")

    flaky.apply()
    broken.apply()

    labels = {"queue": "unit", "task": name}
    assert sample("hookline_tasks_total", **labels, outcome="success") == 1
    assert sample("hookline_tasks_total", **labels, outcome="retry") == 1
    assert sample("hookline_tasks_total", **labels, outcome="failure") == 0
    assert (
        sample("hookline_task_retries_total", **labels, error="ConnectionResetError")
        == 1
    )
    assert sample("hookline_task_duration_seconds_count", **labels) == 2
    assert sample("hookline_tasks_in_progress", **labels) == 0
    assert (
        sample(
            "hookline_tasks_total",
            queue="unit",
            task=f"{name}-broken",
            outcome="failure",
        )
        == 1
    )


@pytest.fixture
def metrics_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    return tmp_path / "metrics"


def test_reset_keeps_only_this_process_files(metrics_dir: Path) -> None:
    metrics_dir.mkdir()
    own = os.getpid()
    names = [f"counter_{own}.db", "counter_1.db", f"counter_{own}1.db"]
    names += ["gauge_livesum_2.db", "histogram_3.db"]
    for name in names:
        (metrics_dir / name).write_bytes(b"")

    assert metrics.reset_multiprocess_dir() == metrics_dir
    assert [path.name for path in metrics_dir.iterdir()] == [f"counter_{own}.db"]


def test_live_gauges_of_dead_processes_are_forgotten(metrics_dir: Path) -> None:
    metrics_dir.mkdir()
    dead = 4194302  # above Linux's default pid_max: never a live process here
    for name in (f"gauge_livesum_{dead}.db", f"gauge_livesum_{os.getpid()}.db"):
        (metrics_dir / name).write_bytes(b"")
    (metrics_dir / f"counter_{dead}.db").write_bytes(b"")

    metrics.forget_dead_processes(metrics_dir)

    assert sorted(path.name for path in metrics_dir.iterdir()) == [
        f"counter_{dead}.db",
        f"gauge_livesum_{os.getpid()}.db",
    ]


def pool_settings(**overrides: object):
    return load_settings(
        environ={},
        overrides={
            "HOOKLINE_WORKER_METRICS_PORT": free_port(),
            "HOOKLINE_WORKER_METRICS_HOST": "127.0.0.1",
            **overrides,
        },
    )


def test_a_prefork_pool_without_a_directory_serves_no_port() -> None:
    assert metrics.serve_worker_metrics(pool_settings(), forks=True) is None


def test_no_port_unless_one_is_set() -> None:
    settings = pool_settings(HOOKLINE_WORKER_METRICS_PORT=0)

    assert metrics.serve_worker_metrics(settings, forks=False) is None


@pytest.fixture
def pool_port() -> Iterator[int]:
    settings = pool_settings(HOOKLINE_METRICS_TOKEN="s3cret")
    server = metrics.serve_worker_metrics(settings, forks=False)
    assert server is not None
    yield settings.HOOKLINE_WORKER_METRICS_PORT
    server.shutdown()
    server.server_close()


def test_a_thread_pool_serves_its_own_registry(pool_port: int) -> None:
    url = f"http://127.0.0.1:{pool_port}/metrics"
    metrics.prepare_tasks({"tests.served": "unit"})

    refused = requests.get(url, timeout=5)
    served = requests.get(url, headers={"Authorization": "Bearer s3cret"}, timeout=5)

    assert refused.status_code == 401
    assert served.status_code == 200
    assert (
        'hookline_tasks_total{outcome="success",queue="unit",task="tests.served"} 0.0'
        in served.text
    )


def test_a_port_in_use_does_not_stop_the_pool(pool_port: int) -> None:
    settings = pool_settings(HOOKLINE_WORKER_METRICS_PORT=pool_port)

    assert metrics.serve_worker_metrics(settings, forks=False) is None


def test_a_malformed_accept_header_gets_the_text_format() -> None:
    registry = metrics.scrape_registry()

    body, content_type = metrics.exposition(
        registry, "application/openmetrics-text; version=zzz"
    )

    assert content_type.startswith("text/plain")
    assert body.startswith(b"#") or body == b""
