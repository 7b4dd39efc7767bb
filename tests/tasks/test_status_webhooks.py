"""Status webhooks: an event per committed transition, sent signed, in batches, once.

The receiver is a loopback HTTP server started here; the database is the
session's PostgreSQL, and the last test sends the flush through Redis to a real
callbacks worker.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis
from sqlalchemy import delete, select

from config.settings import ConfigError, Settings, load_settings
from hookline import lifecycle, status_webhooks
from hookline.db import session_scope
from hookline.devtools import free_port
from hookline.models import (
    Conversation,
    ConversationStatus,
    ConversationTransition,
    StatusEvent,
)
from tasks.status_webhooks import check_settings, claim_batch, flush_pending
from tests.conftest import BROKER_URL, REDIS_URL, forget_keys, start_process, wait_until
from workers.celery_app import (
    CALLBACKS_QUEUE,
    FLUSH_STATUS_EVENTS_TASK,
    TASK_ROUTES,
    create_celery,
)

S = ConversationStatus
WEBHOOK_SECRET = "status-webhook-test-secret"
# Short enough for a test; the receiver hangs well past it when told to.
TIMEOUT = 0.3
HANG = 1.0
WAIT = 0.05

_created: list[uuid.UUID] = []


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    answer: str


class Receiver:
    """A status webhook receiver on loopback that records every request it gets.

    Each path answers 200 unless told otherwise: `fail(path, "500", "timeout")`
    makes its next requests answer 500, then hang past the client's timeout.
    """

    def __init__(self) -> None:
        self.received: list[Received] = []
        self._plans: dict[str, list[str]] = {}
        self._always: dict[str, str] = {}
        self._delay = 0.0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                answer = receiver._answer(self.path)
                with receiver._lock:
                    receiver.received.append(
                        Received(self.path, dict(self.headers), body, answer)
                    )
                if answer == "timeout":
                    time.sleep(HANG)
                    return
                time.sleep(receiver._delay)
                self.send_response(int(answer))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._thread = threading.Thread(target=self._server.serve_forever)

    def _answer(self, path: str) -> str:
        with self._lock:
            plan = self._plans.get(path)
            if plan:
                return plan.pop(0)
            return self._always.get(path, "200")

    def start(self) -> Receiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._server.server_port}{path}"

    def fail(self, path: str, *answers: str) -> None:
        self._plans[path] = list(answers)

    def always(self, path: str, answer: str) -> None:
        self._always[path] = answer

    def slow(self, seconds: float) -> None:
        self._delay = seconds

    def requests(self, path: str) -> list[Received]:
        with self._lock:
            return [request for request in self.received if request.path == path]

    def accepted(self, path: str) -> list[Received]:
        return [r for r in self.requests(path) if r.answer.startswith("2")]


def events_of(request: Received) -> list[dict]:
    return json.loads(request.body)["events"]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver().start()
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def _forget(database_url: str) -> Iterator[None]:
    """Forget the configured URLs, and delete this test's rows."""
    yield
    status_webhooks.configured_targets.cache_clear()
    with session_scope(database_url) as session:
        for table in (StatusEvent, ConversationTransition):
            session.execute(delete(table).where(table.conversation_id.in_(_created)))
        session.execute(delete(Conversation).where(Conversation.id.in_(_created)))
    _created.clear()


def configure(monkeypatch: pytest.MonkeyPatch, *urls: str) -> None:
    """Give this process the status webhook URLs, as its environment would."""
    monkeypatch.setenv("HOOKLINE_STATUS_WEBHOOK_URLS", " ".join(urls))
    status_webhooks.configured_targets.cache_clear()


def settings_for(database_url: str, *urls: str, **overrides: object) -> Settings:
    return load_settings(
        environ={},
        overrides={
            "DATABASE_URL": database_url,
            "HOOKLINE_STATUS_WEBHOOK_URLS": " ".join(urls),
            "HOOKLINE_STATUS_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "HOOKLINE_STATUS_WEBHOOK_BATCH_SIZE": 50,
            "HOOKLINE_STATUS_WEBHOOK_ATTEMPTS": 4,
            **overrides,
        },
    )


def flush(database_url: str, *urls: str, **overrides: object) -> int:
    config = settings_for(database_url, *urls, **overrides)
    return flush_pending(config, timeout=TIMEOUT, wait=WAIT)


def new_conversation(database_url: str, number: int = 7) -> uuid.UUID:
    """Store a queued conversation and its first transition, as the pool does."""
    conversation = Conversation(
        id=uuid.uuid4(),
        delivery_id=str(uuid.uuid4()),
        kind="issue",
        repository="octo-user/Hello-World",
        number=number,
        installation_id=4001,
        author="octo-user",
        reaction_path="/repos/octo-user/Hello-World/issues/7/reactions",
        reply_path="/repos/octo-user/Hello-World/issues/7/comments",
        instructions="The request:\nsay hello",
        status=S.QUEUED.value,
    )
    with session_scope(database_url) as session:
        session.add(conversation)
        lifecycle.record(session, conversation.id, None, S.QUEUED, "issue trigger")
    _created.append(conversation.id)
    return conversation.id


def move(
    database_url: str, conversation_id: uuid.UUID, current: S, target: S, cause: str
) -> None:
    with session_scope(database_url) as session:
        lifecycle.record(session, conversation_id, current, target, cause)
        session.get_one(Conversation, conversation_id).status = target.value


def with_events(database_url: str, count: int) -> uuid.UUID:
    """Return a conversation whose transitions made `count` events per URL."""
    conversation_id = new_conversation(database_url)
    move(database_url, conversation_id, S.QUEUED, S.RUNNING, "agent run started")
    for takeover in range(count - 2):
        move(
            database_url,
            conversation_id,
            S.RUNNING,
            S.RUNNING,
            f"taken over {takeover}",
        )
    return conversation_id


def rows(database_url: str, conversation_id: uuid.UUID) -> list[StatusEvent]:
    with session_scope(database_url) as session:
        return list(
            session.scalars(
                select(StatusEvent)
                .where(StatusEvent.conversation_id == conversation_id)
                .order_by(StatusEvent.id)
            )
        )


def test_an_event_exists_only_for_a_committed_transition(
    database_url: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = receiver.url("/first"), receiver.url("/second")
    configure(monkeypatch, first, second)
    conversation_id = new_conversation(database_url, number=42)

    with pytest.raises(RuntimeError), session_scope(database_url) as session:
        lifecycle.record(session, conversation_id, S.QUEUED, S.RUNNING, "started")
        raise RuntimeError("the caller's transaction fails after recording")

    events = rows(database_url, conversation_id)
    assert [event.target_url for event in events] == [first, second]
    assert {event.status for event in events} == {"pending"}
    assert events[0].payload == events[1].payload
    payload = events[0].payload
    assert payload.pop("at").endswith("Z")
    assert payload == {
        "event_id": str(events[0].event_id),
        "conversation_id": str(conversation_id),
        "repository": "octo-user/Hello-World",
        "number": 42,
        "from_status": None,
        "to_status": "queued",
        "cause": "issue trigger",
    }


def test_no_urls_configured_records_no_events(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(monkeypatch)
    conversation_id = with_events(database_url, 3)

    assert rows(database_url, conversation_id) == []
    assert flush(database_url) == 0


def test_a_batch_carries_several_events_up_to_the_batch_size(
    database_url: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = receiver.url("/batches")
    configure(monkeypatch, url)
    conversation_id = with_events(database_url, 7)

    assert flush(database_url, url, HOOKLINE_STATUS_WEBHOOK_BATCH_SIZE=3) == 7

    requests = receiver.requests("/batches")
    assert [len(events_of(request)) for request in requests] == [3, 3, 1]
    events = rows(database_url, conversation_id)
    sent_ids = [
        event["event_id"] for request in requests for event in events_of(request)
    ]
    assert sent_ids == [str(event.event_id) for event in events]
    assert [event["to_status"] for event in events_of(requests[0])] == [
        "queued",
        "running",
        "running",
    ]
    assert {(event.status, event.attempts) for event in events} == {("sent", 1)}
    assert all(event.sent_at is not None for event in events)
    assert [event.batch_id for event in events] == [
        request.headers["X-Hookline-Batch"]
        for request in requests
        for _ in events_of(request)
    ]


def test_the_signature_verifies_with_the_secret_over_the_raw_body(
    database_url: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = receiver.url("/signed")
    configure(monkeypatch, url)
    with_events(database_url, 2)

    flush(database_url, url)

    (request,) = receiver.requests("/signed")
    expected = hmac.new(WEBHOOK_SECRET.encode(), request.body, hashlib.sha256)
    signature = request.headers["X-Hookline-Signature-256"]
    assert signature == f"sha256={expected.hexdigest()}"
    assert status_webhooks.signature_matches(WEBHOOK_SECRET, request.body, signature)
    assert not status_webhooks.signature_matches("other", request.body, signature)
    assert not status_webhooks.signature_matches(
        WEBHOOK_SECRET, request.body + b" ", signature
    )
    assert request.headers["Content-Type"] == "application/json"


@pytest.mark.parametrize("failure", ["500", "429", "timeout"])
def test_a_receiver_failing_twice_gets_the_batch_once(
    database_url: str,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    failure: str,
) -> None:
    url = receiver.url("/flaky")
    configure(monkeypatch, url)
    conversation_id = with_events(database_url, 3)
    receiver.fail("/flaky", failure, failure)

    assert flush(database_url, url) == 3

    requests = receiver.requests("/flaky")
    assert [request.answer for request in requests] == [failure, failure, "200"]
    assert len({request.body for request in requests}) == 1
    assert len({request.headers["X-Hookline-Batch"] for request in requests}) == 1
    assert len(receiver.accepted("/flaky")) == 1
    assert {
        (event.status, event.attempts, event.last_error)
        for event in rows(database_url, conversation_id)
    } == {("sent", 3, None)}


def test_a_receiver_that_always_fails_holds_back_no_other(
    database_url: str,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    down, up = receiver.url("/down"), receiver.url("/up")
    configure(monkeypatch, down, up)
    conversation_id = with_events(database_url, 2)
    receiver.always("/down", "503")

    with caplog.at_level(logging.INFO, logger="tasks.status_webhooks"):
        sent = flush(database_url, down, up, HOOKLINE_STATUS_WEBHOOK_ATTEMPTS=3)

    assert sent == 2
    assert len(receiver.requests("/down")) == 3
    assert len(receiver.accepted("/up")) == 1
    outcomes = {
        (event.target_url, event.status, event.attempts, event.last_error)
        for event in rows(database_url, conversation_id)
    }
    assert outcomes == {(down, "failed", 3, "HTTP 503"), (up, "sent", 1, None)}
    (failed,) = [r for r in caplog.records if r.getMessage() == "status_webhook.failed"]
    assert failed.error == "HTTP 503"
    assert "/down" not in failed.target

    assert flush(database_url, down, up) == 0
    assert len(receiver.requests("/down")) == 3


def test_a_400_is_not_retried(
    database_url: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = receiver.url("/refuses")
    configure(monkeypatch, url)
    conversation_id = with_events(database_url, 2)
    receiver.always("/refuses", "400")

    assert flush(database_url, url) == 0

    assert len(receiver.requests("/refuses")) == 1
    assert {
        (event.status, event.attempts, event.last_error)
        for event in rows(database_url, conversation_id)
    } == {("failed", 1, "HTTP 400")}


def test_an_unreachable_receiver_fails_after_every_attempt(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"http://127.0.0.1:{free_port()}/nobody?token=s3cret"
    configure(monkeypatch, url)
    conversation_id = with_events(database_url, 2)

    assert flush(database_url, url, HOOKLINE_STATUS_WEBHOOK_ATTEMPTS=2) == 0

    (error,) = {event.last_error for event in rows(database_url, conversation_id)}
    assert error.startswith("connection failed")
    assert "s3cret" not in error
    assert {event.attempts for event in rows(database_url, conversation_id)} == {2}


def test_a_claimed_row_is_skipped_by_another_claim(
    database_url: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = receiver.url("/claims")
    configure(monkeypatch, url)
    with_events(database_url, 4)

    with session_scope(database_url) as first:
        held = claim_batch(first, url, 3)
        with session_scope(database_url) as second:
            rest = claim_batch(second, url, 10)

    assert len(held) == 3
    assert len(rest) == 1
    assert {event.id for event in held}.isdisjoint(event.id for event in rest)


def test_concurrent_flushes_send_every_event_once(
    database_url: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = receiver.url("/concurrent")
    configure(monkeypatch, url)
    conversation_id = with_events(database_url, 12)
    receiver.slow(0.1)
    start = threading.Barrier(2)
    results: list[int] = []

    def run() -> None:
        start.wait()
        results.append(flush(database_url, url, HOOKLINE_STATUS_WEBHOOK_BATCH_SIZE=2))

    runs = [threading.Thread(target=run) for _ in range(2)]
    for thread in runs:
        thread.start()
    for thread in runs:
        thread.join(30)
    while sum(results) < 12 and flush(database_url, url) > 0:
        pass  # a run that found the URL busy left the rest to the next run

    sent_ids = [
        event["event_id"]
        for request in receiver.accepted("/concurrent")
        for event in events_of(request)
    ]
    events = rows(database_url, conversation_id)
    assert sorted(sent_ids) == sorted(str(event.event_id) for event in events)
    assert {event.status for event in events} == {"sent"}


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"HOOKLINE_STATUS_WEBHOOK_URLS": "ftp://example.org/x?k=s3cret"}, "URLS"),
        ({"HOOKLINE_STATUS_WEBHOOK_URLS": "http:///no-host"}, "URLS"),
        ({"HOOKLINE_STATUS_WEBHOOK_SECRET": ""}, "HOOKLINE_STATUS_WEBHOOK_SECRET"),
        ({"HOOKLINE_STATUS_WEBHOOK_BATCH_SIZE": 0}, "BATCH_SIZE"),
        ({"HOOKLINE_STATUS_WEBHOOK_ATTEMPTS": 0}, "ATTEMPTS"),
        ({"HOOKLINE_STATUS_WEBHOOK_ATTEMPTS": 200}, "CELERY_VISIBILITY_TIMEOUT"),
    ],
)
def test_unusable_settings_are_refused_by_name(overrides, named) -> None:
    config = settings_for(
        "sqlite://", "https://hooks.example.org/hookline", **overrides
    )

    with pytest.raises(ConfigError, match=named) as refused:
        check_settings(config)

    assert "s3cret" not in str(refused.value)


def test_beat_flushes_every_batch_delay_on_the_callbacks_queue() -> None:
    configured = create_celery(
        settings_for(
            "sqlite://",
            "https://hooks.example.org/hookline",
            HOOKLINE_STATUS_WEBHOOK_BATCH_DELAY=2.5,
        )
    )
    unconfigured = create_celery(settings_for("sqlite://"))

    entry = configured.conf.beat_schedule["flush-status-events"]
    assert entry["task"] == FLUSH_STATUS_EVENTS_TASK
    assert entry["schedule"] == 2.5
    assert TASK_ROUTES[FLUSH_STATUS_EVENTS_TASK] == {"queue": CALLBACKS_QUEUE}
    assert "flush-status-events" not in unconfigured.conf.beat_schedule


def test_a_real_callbacks_worker_runs_the_flush_sent_through_the_broker(
    database_url: str,
    environment: dict[str, str],
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    url = receiver.url("/from-worker")
    configure(monkeypatch, url)
    conversation_id = with_events(database_url, 3)
    prefix = f"hookline-statuswh-{uuid.uuid4().hex[:8]}:"
    env = {
        **environment,
        "HOOKLINE_STATUS_WEBHOOK_URLS": url,
        "HOOKLINE_STATUS_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "CELERY_BROKER_KEYPREFIX": prefix,
        "HOOKLINE_REDIS_PREFIX": prefix,
    }
    log = tmp_path / "callbacks.log"
    worker = start_process(
        [
            *("celery", "-A", "workers.celery_app", "worker", "-Q", CALLBACKS_QUEUE),
            *("-n", f"statuswh-{uuid.uuid4().hex[:8]}@test", "--pool", "threads"),
            *("--concurrency", "2", "--without-gossip", "--without-mingle"),
            *("-l", "INFO"),
        ],
        env,
        log,
    )
    try:
        wait_until(lambda: "ready." in log.read_text(), 60, "the worker starting")
        # No queue named: the route must take it to the callbacks queue.
        create_celery(load_settings(env), publisher=True).send_task(
            FLUSH_STATUS_EVENTS_TASK
        )
        wait_until(
            lambda: {e.status for e in rows(database_url, conversation_id)} == {"sent"},
            30,
            "the worker sending the batch",
        )
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
        for database in (BROKER_URL, REDIS_URL):
            forget_keys(redis.Redis.from_url(database), prefix)

    (request,) = receiver.accepted("/from-worker")
    assert len(events_of(request)) == 3
    assert status_webhooks.signature_matches(
        WEBHOOK_SECRET, request.body, request.headers["X-Hookline-Signature-256"]
    )
    assert "status_webhook.sent" in log.read_text()
