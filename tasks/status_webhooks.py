"""Send the status events outbox to its receivers, in signed batches.

Beat queues the flush every HOOKLINE_STATUS_WEBHOOK_BATCH_DELAY seconds on the
callbacks queue. A run takes each URL's oldest pending events, at most
HOOKLINE_STATUS_WEBHOOK_BATCH_SIZE at a time, POSTs them as one body, and marks
them sent, or failed once HOOKLINE_STATUS_WEBHOOK_ATTEMPTS are spent.

The rows stay locked while their batch is sent: a second run skips them
(`FOR UPDATE SKIP LOCKED`), and a run that dies mid-batch leaves them pending, to
be sent again. Delivery is therefore at least once; receivers dedupe on
`event_id`.

TODO: rows are never deleted; status_events grows by a row per transition and URL.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sys
import time
import uuid
from dataclasses import dataclass

import requests
from celery import signals
from sqlalchemy import select, text
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

# Seconds to connect, and then between bytes of the answer, for every POST.
# TODO: the read timeout bounds each wait, not the whole answer; a receiver that
# dribbles its headers out can hold a run past RUN_BUDGET.
REQUEST_TIMEOUT = 5.0
RETRY_WAIT = 0.5
# A run starts no new batch after this many seconds; what is left waits for the
# next run. The callbacks pool runs threads, where Celery enforces no time limit.
RUN_BUDGET = 30.0

State = StatusEvent.State


def longest_batch(attempts: int, timeout: float = REQUEST_TIMEOUT) -> float:
    """Return the longest one batch can take: every attempt timing out twice."""
    return attempts * 2 * timeout + (attempts - 1) * RETRY_WAIT


def check_settings(config: Settings) -> None:
    """Refuse status webhook settings that cannot work, naming the variable."""
    if not target_urls(config):
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


@signals.worker_init.connect
def _refuse_to_start_misconfigured(**_: object) -> None:
    # Every pool records transitions, so every pool checks, not only callbacks.
    try:
        check_settings(common.settings())
    except ConfigError as exc:
        print(f"hookline worker: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


class ReceiverRefused(Exception):
    """The receiver answered, but not with a 2xx."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status

    @property
    def transient(self) -> bool:
        """Tell whether the same batch may succeed later (5xx, 429)."""
        return self.status >= 500 or self.status == 429


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, ReceiverRefused):
        return exc.transient
    return isinstance(exc, requests.ConnectionError | requests.Timeout)


def _reason(exc: BaseException) -> str:
    # requests puts the whole URL in its messages, tokens included: keep it out
    # of the rows and the logs.
    if isinstance(exc, ReceiverRefused):
        return str(exc)
    if isinstance(exc, requests.Timeout):
        return f"timed out ({type(exc).__name__})"
    if isinstance(exc, requests.ConnectionError):
        return f"connection failed ({type(exc).__name__})"
    return type(exc).__name__


@dataclass(frozen=True)
class Outcome:
    """How sending one batch went: the attempts made, and the last error if any."""

    attempts: int
    error: str | None = None

    @property
    def delivered(self) -> bool:
        return self.error is None


def post_batch(
    http: requests.Session,
    url: str,
    body: bytes,
    headers: dict[str, str],
    attempts: int,
    timeout: float = REQUEST_TIMEOUT,
    wait: float = RETRY_WAIT,
) -> Outcome:
    """POST one batch until a 2xx, a permanent refusal or the last attempt."""
    made = 0

    def attempt() -> None:
        nonlocal made
        made += 1
        # A redirect is not followed: requests would turn the POST into a GET.
        with http.post(
            url,
            data=body,
            headers=headers,
            timeout=timeout,
            allow_redirects=False,
            stream=True,
        ) as response:
            status = response.status_code
        if not 200 <= status < 300:
            raise ReceiverRefused(status)

    def warn(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning(
            "status_webhook.retrying",
            extra={
                "target": redacted(url),
                "batch": headers[BATCH_HEADER],
                "attempt": state.attempt_number,
                "error": _reason(error) if error else None,
            },
        )

    retrying = Retrying(
        stop=stop_after_attempt(attempts),
        wait=wait_fixed(wait),
        retry=retry_if_exception(_transient),
        before_sleep=warn,
        reraise=True,
    )
    try:
        retrying(attempt)
    except (ReceiverRefused, requests.RequestException) as exc:
        return Outcome(made, _reason(exc))
    return Outcome(made)


def _lock_target(session: Session, url: str) -> bool:
    """Take this URL for the transaction, unless another run has it.

    One batch per receiver at a time keeps its events in order, and keeps a dead
    receiver from holding every callbacks thread in retries. SQLite has no such
    lock; run one flush at a time there.
    """
    if session.get_bind().dialect.name != "postgresql":
        return True
    digest = hashlib.blake2b(f"status-webhook:{url}".encode(), digest_size=8)
    key = int.from_bytes(digest.digest(), "big", signed=True)
    return session.execute(
        text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": key}
    ).scalar_one()


def claim_batch(session: Session, url: str, size: int) -> list[StatusEvent]:
    """Lock up to `size` of a URL's oldest pending events that no run holds."""
    query = (
        select(StatusEvent)
        .where(StatusEvent.target_url == url, StatusEvent.status == State.PENDING)
        .order_by(StatusEvent.id)
        .limit(size)
        .with_for_update(skip_locked=True)
    )
    return list(session.scalars(query))


def flush_target(
    config: Settings,
    url: str,
    http: requests.Session,
    timeout: float = REQUEST_TIMEOUT,
    wait: float = RETRY_WAIT,
) -> tuple[int, Outcome | None]:
    """Send one batch of a URL's pending events; return its size and outcome.

    The outcome is None when there was nothing to send or another run holds the
    URL.
    """
    with session_scope(config.DATABASE_URL) as session:
        if not _lock_target(session, url):
            log.info("status_webhook.target_busy", extra={"target": redacted(url)})
            return 0, None
        events = claim_batch(session, url, config.HOOKLINE_STATUS_WEBHOOK_BATCH_SIZE)
        if not events:
            return 0, None

        batch_id = str(uuid.uuid4())
        body = encode_batch([event.payload for event in events])
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "Hookline-Status-Webhooks",
            SIGNATURE_HEADER: sign(config.HOOKLINE_STATUS_WEBHOOK_SECRET, body),
            BATCH_HEADER: batch_id,
        }
        outcome = post_batch(
            http,
            url,
            body,
            headers,
            config.HOOKLINE_STATUS_WEBHOOK_ATTEMPTS,
            timeout,
            wait,
        )

        now = utcnow()
        for event in events:
            event.attempts += outcome.attempts
            event.batch_id = batch_id
            if outcome.delivered:
                event.status = State.SENT
                event.sent_at = now
            else:
                event.status = State.FAILED
                event.last_error = outcome.error

    fields = {
        "target": redacted(url),
        "batch": batch_id,
        "events": len(events),
        "attempts": outcome.attempts,
    }
    if outcome.delivered:
        log.info("status_webhook.sent", extra=fields)
    else:
        log.error("status_webhook.failed", extra={**fields, "error": outcome.error})
    return len(events), outcome


def flush_pending(
    config: Settings,
    http: requests.Session | None = None,
    timeout: float = REQUEST_TIMEOUT,
    wait: float = RETRY_WAIT,
    budget: float = RUN_BUDGET,
) -> int:
    """Send each URL its pending events, a batch per URL in turn; return how many.

    A URL drops out of the run once it has nothing left, refuses a batch, or is
    busy in another run; no batch starts after `budget` seconds.
    """
    check_settings(config)
    size = config.HOOKLINE_STATUS_WEBHOOK_BATCH_SIZE
    deadline = time.monotonic() + budget
    active = list(target_urls(config))
    sent = 0
    with contextlib.nullcontext(http) if http else requests.Session() as client:
        while active and time.monotonic() < deadline:
            for url in list(active):
                if time.monotonic() >= deadline:
                    break
                claimed, outcome = flush_target(config, url, client, timeout, wait)
                if outcome is not None and outcome.delivered:
                    sent += claimed
                if outcome is None or not outcome.delivered or claimed < size:
                    active.remove(url)
    return sent


@app.task(name=FLUSH_STATUS_EVENTS_TASK)
def flush_status_events() -> int:
    """Send pending conversation status events to the status webhook URLs."""
    try:
        return flush_pending(common.settings())
    except common.OUTAGES as exc:
        # Not retried: beat queues the next run one batch delay from now, and
        # retries would pile up behind it.
        log.warning(
            "status_webhook.flush_deferred", extra={"error": type(exc).__name__}
        )
        return 0
