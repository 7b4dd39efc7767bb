"""Status webhooks: an event per committed transition, sent signed, in batches, once.

The receiver is a loopback HTTP server started here that can fail, hang, answer
late, dribble its answer or redirect; the database is the session's PostgreSQL,
and the last test sends the flush through Redis to a real callbacks worker.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import signal
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import delete, select, text, update

from config.settings import ConfigError, Settings, load_settings
from hookline import lifecycle, status_webhooks
from hookline.db import session_scope
from hookline.devtools import free_port
from hookline.models import (
    Conversation,
    ConversationStatus,
    ConversationTransition,
    StatusEvent,
    utcnow,
)
from tasks.status_webhooks import (
    RETRY_POLICY,
    Outcome,
    RetryPolicy,
    check_settings,
    claim_batch,
    flush_pending,
    record_outcome,
)
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
# The watchdog cuts every POST at twice the timeout.
DEADLINE = 2 * TIMEOUT
HANG = 1.0
WAIT = 0.05
# A dribbling receiver sends a byte of its answer this often, for this long.
DRIBBLE_GAP = 0.1
DRIBBLE_FOR = 5.0
# A test's backoff: quick, but long enough to see a run that is too early.
POLICY = RetryPolicy(first_delay=0.3, max_delay=0.6, give_up_flushes=4)

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
    Besides a status, an answer can be "late" (200 after the client's timeout),
    "dribble" (a byte of the answer now and then, never the end of it), and a 3xx
    points at /moved. Given a TLS context, it answers HTTPS.
    """

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.received: list[Received] = []
        self._plans: dict[str, list[str]] = {}
        self._always: dict[str, str] = {}
        self._delay = 0.0
        self._during: dict[str, Callable[[], object]] = {}
        self.observed: list[object] = []
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
                observe = receiver._during.get(self.path)
                if observe is not None:
                    try:
                        seen = observe()
                    except Exception as exc:
                        seen = exc
                    receiver.observed.append(seen)
                if answer == "timeout":
                    time.sleep(HANG)
                    return
                if answer == "dribble":
                    self._dribble()
                    return
                time.sleep(HANG if answer == "late" else receiver._delay)
                try:
                    self.send_response(200 if answer == "late" else int(answer))
                    if answer.startswith("3"):
                        self.send_header("Location", receiver.url("/moved"))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the client gave up waiting

            def _dribble(self) -> None:
                self.close_connection = True
                end = time.monotonic() + DRIBBLE_FOR
                try:
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Dribble: ")
                    while time.monotonic() < end:
                        time.sleep(DRIBBLE_GAP)
                        self.wfile.write(b"a")
                except OSError:
                    pass

            def log_message(self, *_: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._scheme = "http"
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
            self._scheme = "https"
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
        return f"{self._scheme}://127.0.0.1:{self._server.server_port}{path}"

    def fail(self, path: str, *answers: str) -> None:
        self._plans[path] = list(answers)

    def always(self, path: str, answer: str) -> None:
        self._always[path] = answer

    def slow(self, seconds: float) -> None:
        self._delay = seconds

    def during(self, path: str, observe: Callable[[], object]) -> None:
        """Call `observe` while a request to `path` waits for its answer."""
        self._during[path] = observe

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


def flush(
    database_url: str,
    *urls: str,
    policy: RetryPolicy = POLICY,
    **overrides: object,
) -> int:
    config = settings_for(database_url, *urls, **overrides)
    return flush_pending(config, timeout=TIMEOUT, wait=WAIT, policy=policy)


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


def wait_until_due(database_url: str, conversation_id: uuid.UUID) -> None:
    """Sleep until the conversation's deferred events may be sent again."""
    due = max(event.next_attempt_at for event in rows(database_url, conversation_id))
    time.sleep(max((due - utcnow()).total_seconds(), 0) + 0.05)


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


@pytest.mark.parametrize("failure", ["500", "503", "408", "429"])
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
    assert outcomes == {(down, "pending", 3, "HTTP 503"), (up, "sent", 1, None)}
    (deferred,) = [
        r for r in caplog.records if r.getMessage() == "status_webhook.deferred"
    ]
    assert deferred.error == "HTTP 503"
    assert deferred.failed_flushes == 1
    assert "/down" not in deferred.target

    assert flush(database_url, down, up) == 0
    assert len(receiver.requests("/down")) == 3


@pytest.mark.parametrize("refusal", ["400", "404", "410"])
def test_a_4xx_fails_the_batch_at_once_for_good(
    database_url: str,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    refusal: str,
) -> None:
    url = receiver.url("/refuses")
    configure(monkeypatch, url)
    conversation_id = with_events(database_url, 2)
    receiver.always("/refuses", refusal)

    assert flush(database_url, url) == 0

    assert len(receiver.requests("/refuses")) == 1
    assert {
        (event.status, event.attempts, event.last_error, event.next_attempt_at)
        for event in rows(database_url, conversation_id)
    } == {("failed", 1, f"HTTP {refusal}", None)}
    time.sleep(POLICY.max_delay)
    assert flush(database_url, url) == 0
    assert len(receiver.requests("/refuses")) == 1


@pytest.mark.parametrize("redirect", ["301", "302", "307", "308"])
def test_a_redirect_is_not_followed_and_fails_saying_where_it_pointed(
    database_url: str,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    redirect: str,
) -> None:
    url = receiver.url("/moved-away?token=s3cret")
    configure(monkeypatch, url)
    conversation_id = with_events(database_url, 2)
    receiver.always("/moved-away?token=s3cret", redirect)

    assert flush(database_url, url) == 0

    assert len(receiver.requests("/moved-away?token=s3cret")) == 1
    assert receiver.requests("/moved") == []
    origin = receiver.url("")
    assert {
        (event.status, event.attempts, event.last_error)
        for event in rows(database_url, conversation_id)
    } == {("failed", 1, f"HTTP {redirect}: redirect to {origin} not followed")}


def test_an_unreachable_receiver_is_tried_every_attempt_then_again_later(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"http://127.0.0.1:{free_port()}/nobody?token=s3cret"
    configure(monkeypatch, url)
    conversation_id = with_events(database_url, 2)

    assert flush(database_url, url, HOOKLINE_STATUS_WEBHOOK_ATTEMPTS=2) == 0

    events = rows(database_url, conversation_id)
    (error,) = {event.last_error for event in events}
    assert error == "connection failed (ConnectionRefusedError)"
    assert "s3cret" not in error
    assert {(event.status, event.attempts) for event in events} == {("pending", 2)}


def test_a_batch_a_whole_flush_failed_is_sent_again_after_its_backoff(
    database_url: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = receiver.url("/outage")
    configure(monkeypatch, url)
    conversation_id = with_events(database_url, 3)
    receiver.fail("/outage", "503", "503", "503", "503")

    before = utcnow()
    assert flush(database_url, url, HOOKLINE_STATUS_WEBHOOK_ATTEMPTS=4) == 0

    events = rows(database_url, conversation_id)
    assert {
        (event.status, event.attempts, event.failed_flushes, event.last_error)
        for event in events
    } == {("pending", 4, 1, "HTTP 503")}
    (due,) = {event.next_attempt_at for event in events}
    first_wait = (due - before).total_seconds()
    assert POLICY.first_delay * 0.9 <= first_wait <= POLICY.first_delay * 1.1 + 0.2

    assert flush(database_url, url) == 0
    assert len(receiver.requests("/outage")) == 4

    wait_until_due(database_url, conversation_id)
    assert flush(database_url, url) == 3

    requests = receiver.requests("/outage")
    assert [request.answer for request in requests] == ["503"] * 4 + ["200"]
    assert len({request.body for request in requests}) == 1
    assert len({request.headers["X-Hookline-Batch"] for request in requests}) == 1
    assert {
        (
            event.status,
            event.attempts,
            event.failed_flushes,
            event.last_error,
            event.next_attempt_at,
        )
        for event in rows(database_url, conversation_id)
    } == {("sent", 5, 1, None, None)}


def test_backoff_doubles_to_its_cap_then_the_batch_is_given_up(
    database_url: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = receiver.url("/dead")
    configure(monkeypatch, url)
    conversation_id = with_events(database_url, 2)
    receiver.always("/dead", "503")
    waits = []

    for failed in range(1, POLICY.give_up_flushes):
        before = utcnow()
        assert flush(database_url, url, HOOKLINE_STATUS_WEBHOOK_ATTEMPTS=1) == 0
        event = rows(database_url, conversation_id)[0]
        assert (event.status, event.failed_flushes) == ("pending", failed)
        waits.append((event.next_attempt_at - before).total_seconds())
        assert flush(database_url, url, HOOKLINE_STATUS_WEBHOOK_ATTEMPTS=1) == 0
        assert len(receiver.requests("/dead")) == failed
        wait_until_due(database_url, conversation_id)
    assert flush(database_url, url, HOOKLINE_STATUS_WEBHOOK_ATTEMPTS=1) == 0

    for wait, base in zip(waits, [0.3, 0.6, 0.6], strict=True):
        assert base * 0.9 <= wait <= base * 1.1 + 0.2
    assert {
        (
            event.status,
            event.failed_flushes,
            event.attempts,
            event.last_error,
            event.next_attempt_at,
        )
        for event in rows(database_url, conversation_id)
    } == {("failed", 4, 4, "HTTP 503", None)}
    time.sleep(POLICY.max_delay)
    assert flush(database_url, url) == 0
    assert len(receiver.requests("/dead")) == 4


def test_a_batch_failing_once_its_oldest_event_is_too_old_is_given_up(
    database_url: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = receiver.url("/stale")
    configure(monkeypatch, url)
    conversation_id = with_events(database_url, 2)
    receiver.always("/stale", "503")
    policy = RetryPolicy(first_delay=0.1, give_up_flushes=100, give_up_age=1.0)
    once = {"HOOKLINE_STATUS_WEBHOOK_ATTEMPTS": 1}

    assert flush(database_url, url, policy=policy, **once) == 0
    assert {e.status for e in rows(database_url, conversation_id)} == {"pending"}
    time.sleep(1.0)
    assert flush(database_url, url, policy=policy, **once) == 0

    assert {
        (event.status, event.failed_flushes, event.last_error)
        for event in rows(database_url, conversation_id)
    } == {("failed", 2, "HTTP 503")}


def test_the_default_backoff_runs_from_5_s_to_5_minutes_then_gives_up() -> None:
    for failed, base in enumerate([5, 10, 20, 40, 80, 160, 300, 300, 300], start=1):
        assert base * 0.9 <= RETRY_POLICY.delay(failed) <= base * 1.1

    assert not RETRY_POLICY.gives_up(29, age=3600)
    assert RETRY_POLICY.gives_up(30, age=0)
    assert RETRY_POLICY.gives_up(1, age=24 * 3600)


def test_a_receiver_answering_late_gets_the_batch_once_a_flush_as_one_batch(
    database_url: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = receiver.url("/late")
    configure(monkeypatch, url)
    conversation_id = with_events(database_url, 3)
    receiver.fail("/late", "late")

    started = time.monotonic()
    assert flush(database_url, url) == 0
    assert time.monotonic() - started < HANG

    (first,) = receiver.requests("/late")
    batch_id = first.headers["X-Hookline-Batch"]
    assert {
        (event.status, event.attempts, event.last_error, event.batch_id)
        for event in rows(database_url, conversation_id)
    } == {("pending", 1, "timed out (read)", batch_id)}

    wait_until_due(database_url, conversation_id)
    assert flush(database_url, url) == 3

    first, second = receiver.requests("/late")
    assert second.headers["X-Hookline-Batch"] == batch_id
    assert second.body == first.body
    signature = "X-Hookline-Signature-256"
    assert second.headers[signature] == first.headers[signature]
    assert {
        (event.status, event.attempts, event.batch_id)
        for event in rows(database_url, conversation_id)
    } == {("sent", 2, batch_id)}


def test_a_receiver_dribbling_its_answer_is_cut_off_at_the_deadline(
    database_url: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = receiver.url("/dribble")
    configure(monkeypatch, url)
    conversation_id = with_events(database_url, 2)
    receiver.fail("/dribble", "dribble")

    started = time.monotonic()
    sent = flush(database_url, url)
    elapsed = time.monotonic() - started

    assert DEADLINE <= elapsed < DEADLINE + 1.0
    assert sent == 0
    assert len(receiver.requests("/dribble")) == 1
    assert {
        (event.status, event.attempts, event.last_error)
        for event in rows(database_url, conversation_id)
    } == {("pending", 1, f"timed out (no answer within {DEADLINE:g} s)")}


def test_no_transaction_or_row_lock_is_held_while_a_batch_is_posted(
    database_url: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = receiver.url("/watched")
    configure(monkeypatch, url)
    conversation_id = with_events(database_url, 2)

    def observe() -> tuple[int, list[str]]:
        with session_scope(database_url) as session:
            idle = session.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database()"
                    " AND pid <> pg_backend_pid()"
                    " AND state LIKE 'idle in transaction%'"
                )
            ).scalar_one()
            statuses = session.scalars(
                select(StatusEvent.status)
                .where(StatusEvent.conversation_id == conversation_id)
                .with_for_update(nowait=True)
            ).all()
        return idle, list(statuses)

    receiver.during("/watched", observe)

    assert flush(database_url, url) == 2

    assert receiver.observed == [(0, ["sending", "sending"])]
    assert {e.status for e in rows(database_url, conversation_id)} == {"sent"}


def test_a_live_claim_holds_its_url_and_a_lapsed_one_is_sent_again_as_its_batch(
    database_url: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = receiver.url("/lapsed")
    configure(monkeypatch, url)
    conversation_id = with_events(database_url, 3)
    with session_scope(database_url) as session:
        held = claim_batch(session, url, 10, lease=60)

    assert flush(database_url, url) == 0
    assert receiver.requests("/lapsed") == []

    # The run that claimed the batch died before it reported.
    with session_scope(database_url) as session:
        session.execute(
            update(StatusEvent)
            .where(StatusEvent.id.in_([event.id for event in held]))
            .values(claimed_until=utcnow() - timedelta(seconds=1))
        )
    assert flush(database_url, url) == 3

    (request,) = receiver.accepted("/lapsed")
    assert request.headers["X-Hookline-Batch"] == held[0].batch_id
    with session_scope(database_url) as session:
        late_report = Outcome(attempts=1, error="HTTP 503")
        assert record_outcome(session, held, late_report, POLICY) is None
    assert {
        (event.status, event.batch_id, event.claim_token)
        for event in rows(database_url, conversation_id)
    } == {("sent", held[0].batch_id, None)}


def _without_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    for scheme in ("http", "https", "all", "no"):
        for name in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY"):
            monkeypatch.delenv(name, raising=False)


def test_an_http_proxy_from_the_environment_carries_the_batch(
    database_url: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    _without_proxies(monkeypatch)
    proxy = receiver.url("").replace("http://", "http://hookline:pa55@")
    monkeypatch.setenv("HTTP_PROXY", proxy)
    url = "http://receiver.invalid/through-proxy?token=s3cret"
    configure(monkeypatch, url)
    with_events(database_url, 2)

    assert flush(database_url, url) == 2

    (request,) = receiver.requests(url)
    assert request.headers["Host"] == "receiver.invalid"
    credentials = base64.b64encode(b"hookline:pa55").decode()
    assert request.headers["Proxy-Authorization"] == f"Basic {credentials}"


def test_a_proxy_that_is_not_http_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _without_proxies(monkeypatch)
    monkeypatch.setenv("HTTPS_PROXY", "https://proxy.example.org:3128")
    config = settings_for("sqlite://", "https://hooks.example.org/hookline")

    with pytest.raises(ConfigError, match="HTTPS_PROXY"):
        check_settings(config)


def certificate_for_loopback(directory: Path) -> tuple[Path, Path]:
    """Write a certificate for 127.0.0.1, its own authority, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = utcnow()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    certificate_path = directory / "loopback.pem"
    key_path = directory / "loopback.key"
    certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return certificate_path, key_path


@pytest.fixture
def tls_receiver(tmp_path: Path) -> Iterator[tuple[Receiver, Path]]:
    certificate, key = certificate_for_loopback(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, key)
    running = Receiver(tls=context).start()
    yield running, certificate
    running.stop()


def test_an_https_receiver_is_verified_against_the_ca_bundle(
    database_url: str,
    tls_receiver: tuple[Receiver, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    receiver, certificate = tls_receiver
    _without_proxies(monkeypatch)
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    url = receiver.url("/tls")
    configure(monkeypatch, url)
    conversation_id = with_events(database_url, 2)

    assert flush(database_url, url) == 0
    assert receiver.requests("/tls") == []
    assert {
        (event.status, event.last_error)
        for event in rows(database_url, conversation_id)
    } == {("pending", "connection failed (SSLCertVerificationError)")}

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificate))
    wait_until_due(database_url, conversation_id)
    assert flush(database_url, url) == 2
    (request,) = receiver.accepted("/tls")
    assert request.headers["Host"] == url.split("/")[2]


def test_a_claimed_row_is_skipped_by_another_claim(
    database_url: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = receiver.url("/claims")
    configure(monkeypatch, url)
    with_events(database_url, 4)

    with session_scope(database_url) as first:
        held = claim_batch(first, url, 3, lease=60)
        with session_scope(database_url) as second:
            rest = claim_batch(second, url, 10, lease=60)

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
