"""Send the status events outbox to its receivers, in signed batches.

Beat queues the flush every HOOKLINE_STATUS_WEBHOOK_BATCH_DELAY seconds on the
callbacks queue. For each URL a run claims the batch at the head of its queue:
the batch already tried, whole and under the same batch id, once it is due
again; or else up to HOOKLINE_STATUS_WEBHOOK_BATCH_SIZE of the oldest new events.
It POSTs the batch as one body and records how that went.

A claim is a transaction of its own that commits before the POST: its rows turn
`sending`, with a claim token and an expiry, so no transaction and no row lock
stay open while a receiver takes its time. The outcome is written in a second
transaction, to the rows that still carry the token. A run that dies mid-batch
leaves its claim to lapse, and a later run sends the batch again, as the same
batch. Delivery is therefore at least once; receivers dedupe on `event_id`.

A batch that is not delivered goes back to `pending` with a next-attempt time,
RETRY_POLICY's backoff, and is given up (`failed`) only after that policy's bound;
an answer that no retry can change (a redirect, most 4xx) fails it at once.

TODO: rows are never deleted; status_events grows by a row per transition and URL.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import random
import socket
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from http.client import HTTPConnection, HTTPException
from urllib.parse import SplitResult, unquote, urljoin, urlsplit, urlunsplit

import requests.certs
import requests.utils
from celery import signals
from sqlalchemy import and_, or_, select, text
from sqlalchemy.orm import Session
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_fixed,
)

from config.settings import ConfigError, Settings
from hookline.db import session_scope
from hookline.models import StatusEvent, utcnow
from hookline.status_webhooks import (
    BATCH_HEADER,
    SIGNATURE_HEADER,
    encode_batch,
    redacted,
    sign,
    target_urls,
)
from tasks import common
from workers.celery_app import FLUSH_STATUS_EVENTS_TASK, app

log = logging.getLogger(__name__)

# Seconds to connect, and then between bytes of the answer. A watchdog cuts every
# POST at twice this in all, however slowly the receiver answers.
# TODO: name lookup is outside the cut; a resolver that hangs holds the POST.
REQUEST_TIMEOUT = 5.0
RETRY_WAIT = 0.5
# A run starts no new batch after this many seconds; what is left waits for the
# next run. The callbacks pool runs threads, where Celery enforces no time limit.
RUN_BUDGET = 30.0
# A claim outlives the longest batch by this much: time to write the outcome,
# and room for clocks that differ between workers.
CLAIM_MARGIN = 60.0

State = StatusEvent.State
UNSENT = (State.PENDING, State.SENDING)


@dataclass(frozen=True)
class RetryPolicy:
    """When a batch that was not delivered is tried again, and when it is given up.

    After its nth failed flush a batch waits first_delay * 2^(n-1) seconds, at
    most max_delay, give or take a tenth. It is given up after give_up_flushes
    failed flushes, or at a failed flush once its oldest event is give_up_age
    seconds old, whichever comes first.
    """

    first_delay: float = 5.0
    max_delay: float = 300.0
    give_up_flushes: int = 30
    give_up_age: float = 24 * 3600.0

    def delay(self, failed_flushes: int) -> float:
        """Return the seconds to wait after a batch's `failed_flushes`-th failure."""
        doublings = min(max(failed_flushes - 1, 0), 32)
        base = min(self.max_delay, self.first_delay * 2**doublings)
        # Jitter, so that batches that failed together do not return together.
        return base * random.uniform(0.9, 1.1)

    def gives_up(self, failed_flushes: int, age: float) -> bool:
        """Tell whether a batch that just failed a flush is past retrying."""
        return failed_flushes >= self.give_up_flushes or age >= self.give_up_age


# Thirty failed flushes: about two hours of a receiver that stays down.
RETRY_POLICY = RetryPolicy()


def longest_batch(attempts: int, timeout: float = REQUEST_TIMEOUT) -> float:
    """Return the longest one batch can take: every attempt cut at its deadline."""
    return attempts * 2 * timeout + (attempts - 1) * RETRY_WAIT


def check_settings(config: Settings) -> None:
    """Refuse status webhook settings that cannot work, naming the variable."""
    urls = target_urls(config)
    if not urls:
        return
    if not config.HOOKLINE_STATUS_WEBHOOK_SECRET:
        raise ConfigError(
            "HOOKLINE_STATUS_WEBHOOK_URLS is set but HOOKLINE_STATUS_WEBHOOK_SECRET "
            "is not: receivers could not verify that events come from Hookline."
        )
    counts = ("HOOKLINE_STATUS_WEBHOOK_BATCH_SIZE", "HOOKLINE_STATUS_WEBHOOK_ATTEMPTS")
    for name in counts:
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be at least 1.")
    if config.HOOKLINE_STATUS_WEBHOOK_BATCH_DELAY <= 0:
        raise ConfigError("HOOKLINE_STATUS_WEBHOOK_BATCH_DELAY must be above 0.")
    longest = RUN_BUDGET + longest_batch(config.HOOKLINE_STATUS_WEBHOOK_ATTEMPTS)
    if longest >= config.CELERY_VISIBILITY_TIMEOUT:
        raise ConfigError(
            f"HOOKLINE_STATUS_WEBHOOK_ATTEMPTS="
            f"{config.HOOKLINE_STATUS_WEBHOOK_ATTEMPTS} lets one flush run "
            f"{longest:g} s, not below CELERY_VISIBILITY_TIMEOUT="
            f"{config.CELERY_VISIBILITY_TIMEOUT:g} s: the broker would deliver it "
            "twice."
        )
    for position, url in enumerate(urls, start=1):
        proxy, _ = _route(url)
        if proxy is not None and proxy.scheme != "http":
            raise ConfigError(
                f"The proxy that HTTP_PROXY, HTTPS_PROXY or ALL_PROXY names for "
                f"HOOKLINE_STATUS_WEBHOOK_URLS entry {position} is not an http:// "
                "proxy: status webhooks go through http:// proxies only."
            )


@signals.worker_init.connect
def _refuse_to_start_misconfigured(**_: object) -> None:
    # Every pool records transitions, so every pool checks, not only callbacks.
    try:
        check_settings(common.settings())
    except ConfigError as exc:
        print(f"hookline worker: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


class Undelivered(Exception):
    """A POST that did not deliver its batch, with the reason kept in the rows.

    The reason never holds the URL: receivers often carry a token in it.
    """

    # Whether sending the same batch again at once may help.
    retry_now = False
    # Whether no later flush can help either.
    permanent = False

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Unreachable(Undelivered):
    """The batch never reached the receiver: no connection, or it broke sending."""

    retry_now = True


class AnswerLost(Undelivered):
    """The batch went out but no answer came in time: the receiver may have it.

    Sending it again at once would only pile copies on a slow receiver; a later
    flush sends it again, under the same batch id.
    """


class ReceiverRefused(Undelivered):
    """The receiver answered, but not with a 2xx."""

    def __init__(self, status: int, reason: str | None = None) -> None:
        super().__init__(reason or f"HTTP {status}")
        self.status = status
        # 5xx, 408 and 429 may go away; a redirect or another 4xx, 410 Gone
        # included, is the same answer next time.
        self.retry_now = status >= 500 or status in {408, 429}
        self.permanent = not self.retry_now


def _refusal(url: str, status: int, location: str | None) -> ReceiverRefused:
    if not 300 <= status < 400:
        return ReceiverRefused(status)
    # A redirect is not followed: a receiver's answer must not send signed
    # events to a host nobody configured. Name where it pointed, origin only.
    try:
        parts = urlsplit(urljoin(url, location or ""))
        port = f":{parts.port}" if parts.port else ""
        where = f" to {parts.scheme}://{parts.hostname}{port}" if location else ""
    except ValueError:
        where = ""
    return ReceiverRefused(status, f"HTTP {status}: redirect{where} not followed")


def _route(url: str) -> tuple[SplitResult | None, str]:
    """Return the proxy and the CA bundle for `url`, from the environment.

    They are read as requests reads them for Hookline's GitHub calls:
    HTTP(S)_PROXY, ALL_PROXY and NO_PROXY; REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE or
    certifi's bundle.
    """
    proxy = requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))
    if proxy and "://" not in proxy:
        proxy = f"http://{proxy}"
    bundle = (
        os.environ.get("REQUESTS_CA_BUNDLE")
        or os.environ.get("CURL_CA_BUNDLE")
        or requests.certs.where()
    )
    return (urlsplit(proxy) if proxy else None), bundle


@cache
def _tls_context(bundle: str) -> ssl.SSLContext:
    if os.path.isdir(bundle):
        return ssl.create_default_context(capath=bundle)
    return ssl.create_default_context(cafile=bundle)


def _basic(user: str, password: str | None) -> str:
    credentials = f"{unquote(user)}:{unquote(password or '')}".encode()
    return "Basic " + base64.b64encode(credentials).decode()


class _Watchdog:
    """Cut a connection's socket once `seconds` have passed, however it stalls.

    Socket timeouts bound each wait for a byte, not the whole answer: a receiver
    that sends one byte every few seconds would hold the POST for as long as it
    likes.
    """

    def __init__(self, connection: HTTPConnection, seconds: float) -> None:
        self.seconds = seconds
        self.fired = False
        self._connection = connection
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._cut)
        self._timer.daemon = True

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._timer.cancel()

    def _cut(self) -> None:
        with self._lock:
            self.fired = True
            sock = self._connection.sock
            if sock is not None:
                # The plain socket's shutdown, on a TLS socket too: it wakes the
                # thread blocked reading it, which then closes it.
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def check(self) -> None:
        """Raise AnswerLost if the deadline passed before there was a socket to cut."""
        with self._lock:
            if self.fired:
                raise self.expired()

    def wrap_tls(self, context: ssl.SSLContext, hostname: str) -> ssl.SSLSocket:
        """Put TLS on the connection's socket, never mid-cut; do not shake hands."""
        # Wrapping detaches the plain socket: a cut in between would miss both.
        with self._lock:
            if self.fired:
                raise self.expired()
            secured = context.wrap_socket(
                self._connection.sock,
                server_hostname=hostname,
                do_handshake_on_connect=False,
            )
            self._connection.sock = secured
            return secured

    def expired(self) -> AnswerLost:
        return AnswerLost(f"timed out (no answer within {self.seconds:g} s)")


def _prepare(
    url: str, headers: Mapping[str, str], timeout: float
) -> tuple[HTTPConnection, str, dict[str, str]]:
    """Return an unconnected connection for `url`, the request target and headers.

    An https:// URL gets a plain connection here; TLS goes on once it connects.
    """
    parts = urlsplit(url)
    hostname = parts.hostname or ""
    host = parts.netloc.rpartition("@")[2]
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = urlunsplit(("", "", parts.path or "/", parts.query, ""))
    request_headers = {"Host": host, **headers}
    if parts.username is not None:
        request_headers["Authorization"] = _basic(parts.username, parts.password)

    proxy, _ = _route(url)
    if proxy is None:
        return HTTPConnection(hostname, port, timeout=timeout), target, request_headers

    connection = HTTPConnection(proxy.hostname or "", proxy.port or 80, timeout=timeout)
    proxy_headers = {}
    if proxy.username is not None:
        proxy_headers["Proxy-Authorization"] = _basic(proxy.username, proxy.password)
    if parts.scheme == "https":
        connection.set_tunnel(hostname, port, headers=proxy_headers)
        return connection, target, request_headers
    target = urlunsplit(("http", host, parts.path or "/", parts.query, ""))
    return connection, target, {**request_headers, **proxy_headers}


def send_once(
    url: str, body: bytes, headers: Mapping[str, str], timeout: float
) -> tuple[int, str | None]:
    """POST `body` to `url` once; return the answer's status and Location header.

    `timeout` bounds connecting and each wait for a byte; the whole POST is cut at
    twice `timeout`. Raises Unreachable when the batch did not go out, and
    AnswerLost when it went out and no answer came.
    """
    parts = urlsplit(url)
    connection, target, request_headers = _prepare(url, headers, timeout)
    try:
        with _Watchdog(connection, 2 * timeout) as watchdog:
            phase = "connect"
            try:
                connection.connect()
                if parts.scheme == "https":
                    context = _tls_context(_route(url)[1])
                    watchdog.wrap_tls(context, parts.hostname or "").do_handshake()
                watchdog.check()
                phase = "send"
                connection.request("POST", target, body=body, headers=request_headers)
            except (OSError, HTTPException) as exc:
                if watchdog.fired:
                    raise watchdog.expired() from None
                if isinstance(exc, TimeoutError):
                    raise Unreachable(f"timed out ({phase})") from None
                raise Unreachable(f"connection failed ({type(exc).__name__})") from None

            try:
                response = connection.getresponse()
            except (OSError, HTTPException) as exc:
                if watchdog.fired:
                    raise watchdog.expired() from None
                if isinstance(exc, TimeoutError):
                    raise AnswerLost("timed out (read)") from None
                raise AnswerLost(f"no answer ({type(exc).__name__})") from None
            # A cut reads as the end of the headers, so a dribbled answer may
            # parse: it was cut short, and does not count.
            watchdog.check()
            return response.status, response.getheader("Location")
    finally:
        connection.close()


@dataclass(frozen=True)
class Outcome:
    """How sending one batch went: the attempts made, and the last error if any."""

    attempts: int
    error: str | None = None
    # No later flush can deliver it either.
    permanent: bool = False

    @property
    def delivered(self) -> bool:
        return self.error is None


def post_batch(
    url: str,
    body: bytes,
    headers: dict[str, str],
    attempts: int,
    timeout: float = REQUEST_TIMEOUT,
    wait: float = RETRY_WAIT,
) -> Outcome:
    """POST one batch until a 2xx, an answer not worth retrying now, or the last try.

    A batch that may have reached the receiver (no answer in time) is not sent
    again in this flush.
    """
    made = 0

    def attempt() -> None:
        nonlocal made
        made += 1
        status, location = send_once(url, body, headers, timeout)
        if not 200 <= status < 300:
            raise _refusal(url, status, location)

    def warn(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning(
            "status_webhook.retrying",
            extra={
                "target": redacted(url),
                "batch": headers[BATCH_HEADER],
                "attempt": state.attempt_number,
                "error": str(error) if error else None,
            },
        )

    retrying = Retrying(
        stop=stop_after_attempt(attempts),
        wait=wait_fixed(wait),
        retry=retry_if_exception(
            lambda exc: isinstance(exc, Undelivered) and exc.retry_now
        ),
        before_sleep=warn,
        reraise=True,
    )
    try:
        retrying(attempt)
    except Undelivered as exc:
        return Outcome(made, exc.reason, exc.permanent)
    return Outcome(made)


def _lock_target(session: Session, url: str) -> bool:
    """Take this URL for the claim's transaction, unless another run has it.

    Claims of one URL take turns, so that only one of its batches is in flight
    at a time: that keeps its events in order, and keeps a dead receiver from
    holding every callbacks thread. SQLite has no such lock; run one flush at a
    time there.
    """
    if session.get_bind().dialect.name != "postgresql":
        return True
    digest = hashlib.blake2b(f"status-webhook:{url}".encode(), digest_size=8)
    key = int.from_bytes(digest.digest(), "big", signed=True)
    return session.execute(
        text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": key}
    ).scalar_one()


def claim_batch(
    session: Session,
    url: str,
    size: int,
    lease: float,
    now: datetime | None = None,
) -> list[StatusEvent]:
    """Claim the batch at the head of a URL's queue for `lease` seconds.

    The head is the URL's oldest unsent row. A batch tried before is claimed
    again whole, under its batch id; otherwise up to `size` of the oldest new
    events become a batch. Nothing is claimed while the head waits out its
    backoff or another run's claim on it is live. Rows another transaction has
    locked are skipped.
    """
    now = now or utcnow()
    head = session.execute(
        select(
            StatusEvent.status,
            StatusEvent.batch_id,
            StatusEvent.next_attempt_at,
            StatusEvent.claimed_until,
        )
        .where(StatusEvent.target_url == url, StatusEvent.status.in_(UNSENT))
        .order_by(StatusEvent.id)
        .limit(1)
    ).first()
    if head is None:
        return []
    if head.status == State.SENDING and head.claimed_until > now:
        log.info("status_webhook.in_flight", extra={"target": redacted(url)})
        return []
    if head.status == State.PENDING and (head.next_attempt_at or now) > now:
        return []

    query = (
        select(StatusEvent)
        .where(StatusEvent.target_url == url)
        .order_by(StatusEvent.id)
        .with_for_update(skip_locked=True)
    )
    if head.batch_id is None:
        query = query.where(
            StatusEvent.status == State.PENDING, StatusEvent.batch_id.is_(None)
        ).limit(size)
    else:
        lapsed = and_(
            StatusEvent.status == State.SENDING, StatusEvent.claimed_until <= now
        )
        query = query.where(
            StatusEvent.batch_id == head.batch_id,
            StatusEvent.status.in_(UNSENT),
            or_(StatusEvent.status == State.PENDING, lapsed),
        )
    events = list(session.scalars(query))

    token = str(uuid.uuid4())
    batch_id = head.batch_id or str(uuid.uuid4())
    for event in events:
        event.status = State.SENDING
        event.claim_token = token
        event.claimed_until = now + timedelta(seconds=lease)
        event.batch_id = batch_id
    session.flush()
    return events


@dataclass(frozen=True)
class Recorded:
    """What a batch's rows became: their state, failed flushes and next attempt."""

    state: str
    failed_flushes: int
    next_attempt_at: datetime | None


def record_outcome(
    session: Session,
    claimed: list[StatusEvent],
    outcome: Outcome,
    policy: RetryPolicy = RETRY_POLICY,
) -> Recorded | None:
    """Write a batch's outcome to its rows; None if its claim lapsed and was taken.

    A run whose claim was taken over leaves the rows to the run that took them.
    """
    ids = [event.id for event in claimed]
    rows = list(
        session.scalars(
            select(StatusEvent)
            .where(
                StatusEvent.id.in_(ids),
                StatusEvent.status == State.SENDING,
                StatusEvent.claim_token == claimed[0].claim_token,
            )
            .with_for_update()
        )
    )
    if not rows:
        return None

    now = utcnow()
    failed_flushes = max(row.failed_flushes for row in rows)
    next_attempt_at = None
    if outcome.delivered:
        state = State.SENT
    else:
        failed_flushes += 1
        age = (now - min(row.created_at for row in rows)).total_seconds()
        if outcome.permanent or policy.gives_up(failed_flushes, age):
            state = State.FAILED
        else:
            state = State.PENDING
            next_attempt_at = now + timedelta(seconds=policy.delay(failed_flushes))

    for row in rows:
        row.status = state
        row.attempts += outcome.attempts
        row.failed_flushes = failed_flushes
        row.last_error = outcome.error
        row.next_attempt_at = next_attempt_at
        row.claim_token = None
        row.claimed_until = None
        if outcome.delivered:
            row.sent_at = now
    return Recorded(state, failed_flushes, next_attempt_at)


def flush_target(
    config: Settings,
    url: str,
    timeout: float = REQUEST_TIMEOUT,
    wait: float = RETRY_WAIT,
    policy: RetryPolicy = RETRY_POLICY,
) -> tuple[int, Outcome | None]:
    """Send one batch of a URL's pending events; return its size and outcome.

    The outcome is None when there was nothing due, or another run holds the URL.
    """
    attempts = config.HOOKLINE_STATUS_WEBHOOK_ATTEMPTS
    lease = longest_batch(attempts, timeout) + CLAIM_MARGIN
    with session_scope(config.DATABASE_URL) as session:
        if not _lock_target(session, url):
            log.info("status_webhook.target_busy", extra={"target": redacted(url)})
            return 0, None
        events = claim_batch(
            session, url, config.HOOKLINE_STATUS_WEBHOOK_BATCH_SIZE, lease
        )
    if not events:
        return 0, None

    batch_id = events[0].batch_id or ""
    body = encode_batch([event.payload for event in events])
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "Hookline-Status-Webhooks",
        SIGNATURE_HEADER: sign(config.HOOKLINE_STATUS_WEBHOOK_SECRET, body),
        BATCH_HEADER: batch_id,
    }
    outcome = post_batch(url, body, headers, attempts, timeout, wait)
    with session_scope(config.DATABASE_URL) as session:
        recorded = record_outcome(session, events, outcome, policy)

    fields = {
        "target": redacted(url),
        "batch": batch_id,
        "events": len(events),
        "attempts": outcome.attempts,
    }
    if recorded is None:
        log.warning("status_webhook.claim_lapsed", extra=fields)
    elif recorded.state == State.SENT:
        log.info("status_webhook.sent", extra=fields)
    elif recorded.state == State.PENDING:
        retry_in = (recorded.next_attempt_at or utcnow()) - utcnow()
        log.warning(
            "status_webhook.deferred",
            extra={
                **fields,
                "error": outcome.error,
                "failed_flushes": recorded.failed_flushes,
                "retry_in": round(retry_in.total_seconds(), 1),
            },
        )
    else:
        log.error(
            "status_webhook.failed",
            extra={
                **fields,
                "error": outcome.error,
                "failed_flushes": recorded.failed_flushes,
                "gave_up": not outcome.permanent,
            },
        )
    return len(events), outcome


def flush_pending(
    config: Settings,
    timeout: float = REQUEST_TIMEOUT,
    wait: float = RETRY_WAIT,
    budget: float = RUN_BUDGET,
    policy: RetryPolicy = RETRY_POLICY,
) -> int:
    """Send each URL its due events, a batch per URL in turn; return how many.

    A URL drops out of the run once it has nothing due, fails a batch, or is
    busy in another run; no batch starts after `budget` seconds.
    """
    check_settings(config)
    size = config.HOOKLINE_STATUS_WEBHOOK_BATCH_SIZE
    deadline = time.monotonic() + budget
    active = list(target_urls(config))
    sent = 0
    while active and time.monotonic() < deadline:
        for url in list(active):
            if time.monotonic() >= deadline:
                break
            claimed, outcome = flush_target(config, url, timeout, wait, policy)
            if outcome is not None and outcome.delivered:
                sent += claimed
            if outcome is None or not outcome.delivered or claimed < size:
                active.remove(url)
    return sent


@app.task(name=FLUSH_STATUS_EVENTS_TASK)
def flush_status_events() -> int:
    """Send due conversation status events to the status webhook URLs."""
    try:
        return flush_pending(common.settings())
    except common.OUTAGES as exc:
        # Not retried: beat queues the next run one batch delay from now, and
        # retries would pile up behind it.
        log.warning(
            "status_webhook.flush_deferred", extra={"error": type(exc).__name__}
        )
        return 0
