"""The HTTP edge: verify a GitHub delivery, drop replays, store it, queue it.

An accepted delivery is in the inbox (the database) before it is queued and
before GitHub hears 202; nothing here calls GitHub. The classification pool does
the rest.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qs

import redis
from celery import Celery
from flask import Blueprint, Flask, Response, current_app, jsonify, request
from prometheus_client import CollectorRegistry
from werkzeug.middleware.proxy_fix import ProxyFix

from config.logging import bound_delivery
from config.settings import Settings, load_settings
from hookline import metrics
from hookline.inbox import KEPT_HEADERS, Inbox, gateway_engine
from webhook_gateway.dedup import Deduplicator, RateLimiter, body_digest
from webhook_gateway.health import bp as health_bp
from webhook_gateway.intake import Arrival, Enqueue, Intake, Outcome
from webhook_gateway.signature import is_valid_signature
from workers.celery_app import CLASSIFY_TASK, RedisTaskMessages, create_celery

log = logging.getLogger(__name__)

EVENTS_PATH = "/integration/github/events"
METRICS_PATH = "/metrics"
_EVENT_NAME = re.compile(r"[a-z_]{1,64}")
_DELIVERY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,71}")
# GitHub writes the installation as {"id": N, ...}; searched, not parsed, only
# when installations are rate limited (a signed body, so the key is GitHub's).
_INSTALLATION = re.compile(r'"installation":\s*\{\s*"id":\s*(\d{1,19})')

bp = Blueprint("github_events", __name__)
_READ_CHUNK = 1 << 20
# A body longer than this is not put in the task message: the classify pool reads
# it from the inbox. So the gateway holds no second copy of a 25 MB delivery, and
# a backlog of large ones does not fill the broker.
BY_REFERENCE_OVER = 256 * 1024


@dataclass
class Gateway:
    """What one gateway process holds for its whole life: connections and settings."""

    settings: Settings
    secrets: tuple[bytes, ...]
    deduplicator: Deduplicator
    limiter: RateLimiter
    inbox: Inbox
    celery: Celery
    # Set when the broker is the claims' Redis: the task is pushed there directly.
    messages: RedisTaskMessages | None = None
    # Every gunicorn worker's metrics and the queue depths, built once per process.
    metrics_registry: CollectorRegistry | None = None
    # The networks deliveries may come from; empty: any.
    sources: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # Claims, stores and queues verified deliveries in batches (set by create_app).
    intake: Intake = field(init=False)


def _gateway() -> Gateway:
    return current_app.extensions["hookline"]


def _refuse(status: int, reason: str, message: str) -> tuple[Response, int]:
    log.warning("delivery.rejected", extra={"reason": reason, "status": status})
    metrics.delivery_rejected(reason)
    return jsonify(reason=reason, message=message), status


def _read_body(limit: int) -> bytearray | None:
    """Return the raw body, or None when it is longer than `limit` bytes."""
    length = request.content_length
    if length is not None:
        if length > limit:
            return None
        # Filled in place, a megabyte at a time: get_data() holds a body twice
        # (its buffer, then the bytes made of it), 50 MB for a 25 MB delivery.
        body = bytearray(length)
        with memoryview(body) as view:
            filled = 0
            while filled < length:
                chunk = request.stream.read(min(_READ_CHUNK, length - filled))
                if not chunk:
                    break
                view[filled : filled + len(chunk)] = chunk
                filled += len(chunk)
        del body[filled:]
        return body
    # Chunked: no length up front, so read one byte past the limit to notice it.
    body = bytearray()
    while len(body) <= limit:
        chunk = request.stream.read(min(1 << 16, limit + 1 - len(body)))
        if not chunk:
            return body
        body += chunk
    return None


def _payload_text(raw: bytes | bytearray, content_type: str) -> str | None:
    """Return the JSON text of a JSON or form-encoded delivery if it is an object.

    The text, not the parsed object, is what gets queued: the worker parses it
    again, and nothing between needs to walk its nesting.
    """
    try:
        if content_type == "application/x-www-form-urlencoded":
            fields = parse_qs(raw.decode("ascii"), strict_parsing=True)
            text = fields["payload"][0]
        else:
            text = raw.decode("utf-8")
        payload = json.loads(text, object_pairs_hook=_parsed_object)
    except (ValueError, KeyError, RecursionError):
        return None
    return text if payload is _AN_OBJECT else None


# Only whether the body is an object matters: each object is dropped as soon as it
# is parsed, so checking a 25 MB delivery does not build its whole tree in memory.
_AN_OBJECT = object()


def _parsed_object(_: list[tuple[str, object]]) -> object:
    return _AN_OBJECT


@bp.post(EVENTS_PATH)
def receive_delivery() -> tuple[Response, int]:
    """Accept one GitHub webhook delivery."""
    started = time.perf_counter()
    metrics.DELIVERIES_RECEIVED.inc()
    gateway = _gateway()
    # A GUID, compared without case: GitHub sends it in lowercase, and so it is
    # stored, so that the inbox's unique key agrees with the Redis claim.
    delivery_id = request.headers.get("X-GitHub-Delivery", "").lower()
    bound_id = delivery_id if _DELIVERY_ID.fullmatch(delivery_id) else "-"
    event = request.headers.get("X-GitHub-Event", "")
    # The installation is in the body, which the gateway checks but never builds.
    bound_event = event if _EVENT_NAME.fullmatch(event) else None
    try:
        with bound_delivery(bound_id, event=bound_event):
            return _receive(gateway, delivery_id)
    finally:
        metrics.GATEWAY_REQUEST_SECONDS.observe(time.perf_counter() - started)


def _receive(gateway: Gateway, delivery_id: str) -> tuple[Response, int]:
    if not gateway.settings.GITHUB_WEBHOOKS_ENABLED:
        return _refuse(
            503,
            "webhooks_disabled",
            "GitHub webhooks are disabled here (GITHUB_WEBHOOKS_ENABLED=false); "
            "nothing was queued.",
        )

    refusal = _refuse_source(gateway)
    if refusal is not None:
        return refusal

    limit = gateway.settings.HOOKLINE_MAX_BODY_BYTES
    raw = _read_body(limit)
    if raw is None:
        return _refuse(413, "body_too_large", f"Bodies over {limit} bytes are refused.")

    signature = request.headers.get("X-Hub-Signature-256")
    if not is_valid_signature(gateway.secrets, raw, signature):
        return _refuse(
            403,
            "bad_signature",
            "X-Hub-Signature-256 is missing or does not match the body.",
        )

    event = request.headers.get("X-GitHub-Event", "")
    if not _EVENT_NAME.fullmatch(event) or not _DELIVERY_ID.fullmatch(delivery_id):
        return _refuse(
            400,
            "bad_headers",
            "X-GitHub-Event and X-GitHub-Delivery must be present and well formed.",
        )

    content_type = request.mimetype
    if content_type not in {"application/json", "application/x-www-form-urlencoded"}:
        return _refuse(
            415,
            "unsupported_content_type",
            "Send application/json or application/x-www-form-urlencoded.",
        )
    text = _payload_text(raw, content_type)
    if text is None:
        return _refuse(400, "malformed_payload", "The body is not a JSON object.")
    digest = body_digest(raw)
    per_installation = gateway.settings.HOOKLINE_INSTALLATION_RATE_LIMIT
    installation = _INSTALLATION.search(text) if per_installation else None
    # From here on one copy is the delivery: the text, or a large one's bytes.
    body: str | bytes | bytearray = text
    if len(raw) > BY_REFERENCE_OVER:
        body = raw if content_type == "application/json" else text.encode()
    del raw, text
    if installation is not None:
        refusal = _limit(gateway, "installation", installation[1], per_installation)
        if refusal is not None:
            return refusal

    if event == "ping":
        log.info("delivery.ping")
        metrics.DELIVERIES_PING.inc()
        return jsonify(status="pong", delivery=delivery_id), 200

    headers = {
        name: value[:200]
        for name in KEPT_HEADERS
        if (value := request.headers.get(name))
    }
    arrival = Arrival(delivery_id, event, body, digest, headers)
    del body
    if gateway.messages is not None:
        arrival.message = gateway.messages.build(CLASSIFY_TASK, _task_kwargs(arrival))
    outcome = gateway.intake.take(arrival)
    del arrival
    if outcome is Outcome.DUPLICATE:
        log.info("delivery.duplicate")
        metrics.DELIVERIES_DUPLICATE.inc()
        return jsonify(status="duplicate", delivery=delivery_id), 200
    if outcome is not Outcome.QUEUED:
        return _refuse(503, outcome.value, _TRY_AGAIN[outcome])

    log.info("delivery.accepted", extra={"event": event})
    metrics.DELIVERIES_ACCEPTED.inc()
    return jsonify(status="queued", delivery=delivery_id), 202


def _refuse_source(gateway: Gateway) -> tuple[Response, int] | None:
    """Refuse a source outside the allow-list, or over its rate, before reading."""
    source = request.remote_addr or ""
    if gateway.sources:
        try:
            address = ipaddress.ip_address(source)
        except ValueError:
            address = None
        if address is None or not any(address in net for net in gateway.sources):
            return _refuse(
                403, "source_not_allowed", "This address may not send deliveries."
            )
    per_source = gateway.settings.HOOKLINE_SOURCE_RATE_LIMIT
    return _limit(gateway, "source", source, per_source) if per_source else None


def _limit(
    gateway: Gateway, kind: str, key: str, per_minute: int
) -> tuple[Response, int] | None:
    try:
        wait = gateway.limiter.over(kind, key, per_minute)
    except redis.RedisError:
        # Without the count, let it through: the claim just after needs Redis too.
        return None
    if wait is None:
        return None
    response, status = _refuse(
        429, "rate_limited", f"Over {per_minute} deliveries a minute for this {kind}."
    )
    response.headers["Retry-After"] = str(max(1, round(wait)))
    return response, status


_TRY_AGAIN = {
    Outcome.DEDUP_UNAVAILABLE: "Try again: Redis did not answer.",
    Outcome.INBOX_UNAVAILABLE: "Try again: the database did not answer.",
    Outcome.QUEUE_UNAVAILABLE: "Try again: the broker did not answer.",
    Outcome.TIMED_OUT: "Try again: the delivery was not stored in time.",
}


def _task_kwargs(arrival: Arrival) -> dict[str, str]:
    kwargs = {"delivery_id": arrival.delivery_id, "event": arrival.event}
    if isinstance(arrival.body, str):
        kwargs["body"] = arrival.body
    # Else the classify pool reads the body from the inbox.
    return kwargs


def _enqueuer(gateway: Gateway) -> Enqueue:
    """Return how the intake queues a batch: one LPUSH, or Celery one by one."""
    messages = gateway.messages
    if messages is not None:
        key = messages.queue_key(CLASSIFY_TASK)

        def push(arrivals: list[Arrival]) -> list[Arrival]:
            try:
                gateway.deduplicator.push(key, [a.message for a in arrivals])
            except redis.RedisError as exc:
                log.error(
                    "intake.push_failed",
                    extra={
                        "deliveries": [a.delivery_id for a in arrivals],
                        "error": type(exc).__name__,
                    },
                )
                return arrivals
            return []

        return push

    def send(arrivals: list[Arrival]) -> list[Arrival]:
        unsent = []
        for arrival in arrivals:
            try:
                gateway.celery.send_task(CLASSIFY_TASK, kwargs=_task_kwargs(arrival))
            except Exception as exc:
                log.error(
                    "intake.send_failed",
                    extra={
                        "deliveries": [arrival.delivery_id],
                        "error": type(exc).__name__,
                    },
                )
                unsent.append(arrival)
        return unsent

    return send


@bp.get(METRICS_PATH)
def serve_metrics() -> Response | tuple[Response, int]:
    """Expose every gateway worker's counters and the broker's queue depths."""
    gateway = _gateway()
    authorization = request.headers.get("Authorization")
    if not metrics.authorized(gateway.settings.HOOKLINE_METRICS_TOKEN, authorization):
        log.warning("metrics.unauthorized")
        refusal = jsonify(
            reason="unauthorized",
            message="Send Authorization: Bearer <HOOKLINE_METRICS_TOKEN>.",
        )
        refusal.headers["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return refusal, 401

    body, content_type = metrics.exposition(
        gateway.metrics_registry, request.headers.get("Accept")
    )
    return Response(
        body, content_type=content_type, headers={"Cache-Control": "no-store"}
    )


def create_app(settings: Settings | None = None) -> Flask:
    """Build the gateway; refuse to start without a webhook secret."""
    settings = settings or load_settings()
    secrets = settings.webhook_secrets()

    celery = create_celery(settings, publisher=True)
    claims = redis.Redis.from_url(
        settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2
    )
    prefix = settings.HOOKLINE_REDIS_PREFIX
    queue_depths = metrics.queue_depths(
        settings, [queue.name for queue in celery.conf.task_queues]
    )
    app = Flask(__name__)
    # A second guard: Werkzeug refuses to read past this, whatever the framing.
    app.config["MAX_CONTENT_LENGTH"] = settings.HOOKLINE_MAX_BODY_BYTES + 1
    gateway = Gateway(
        settings=settings,
        secrets=secrets,
        deduplicator=Deduplicator(
            claims, settings.HOOKLINE_DELIVERY_TTL, settings.HOOKLINE_BODY_TTL, prefix
        ),
        limiter=RateLimiter(claims, prefix),
        sources=settings.allowed_sources(),
        # A connection for each gunicorn thread of this worker (config/gunicorn.py).
        inbox=Inbox(
            gateway_engine(
                settings.DATABASE_URL,
                connections=int(os.environ.get("WEB_THREADS", "8")),
            )
        ),
        celery=celery,
        messages=(
            RedisTaskMessages(celery, settings)
            if RedisTaskMessages.applies_to(settings)
            else None
        ),
        metrics_registry=metrics.scrape_registry(
            *([queue_depths] if queue_depths is not None else [])
        ),
    )
    gateway.intake = Intake(gateway.deduplicator, gateway.inbox, _enqueuer(gateway))
    app.extensions["hookline"] = gateway
    if settings.HOOKLINE_TRUSTED_PROXIES:
        # Behind N proxies the client's address is the Nth from the right in
        # X-Forwarded-For; without this, every request seems to come from a proxy.
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=settings.HOOKLINE_TRUSTED_PROXIES
        )
    app.register_blueprint(bp)
    app.register_blueprint(health_bp, settings=settings)

    @app.errorhandler(413)
    def _too_large(_: Exception) -> tuple[Response, int]:
        return _refuse(413, "body_too_large", "The body is over the size limit.")

    return app
