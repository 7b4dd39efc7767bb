"""Outgoing status webhooks: the events a conversation's state changes owe receivers.

Operators list receivers in HOOKLINE_STATUS_WEBHOOK_URLS. Each transition that
`hookline.lifecycle.record` adds also adds one `StatusEvent` row per URL, in the
same session (a transactional outbox): an event exists exactly when its
transition committed. `tasks/status_webhooks.py` sends the rows in signed
batches. This module holds what both sides share: the URLs, the payload, the
body and its signature.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import uuid
from collections.abc import Sequence
from functools import cache
from typing import TypedDict
from urllib.parse import urlsplit

from sqlalchemy.orm import Session

from config.settings import ConfigError, Settings, load_settings
from hookline.models import Conversation, ConversationStatus, StatusEvent, utcnow

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Hookline-Signature-256"
BATCH_HEADER = "X-Hookline-Batch"
# An agent's error can be long; receivers get its start, the rest stays in the
# conversation's row.
MAX_CAUSE_CHARS = 1000


class StatusEventPayload(TypedDict):
    """One event as a receiver gets it, inside `{"events": [...]}`."""

    event_id: str
    conversation_id: str
    repository: str
    number: int
    from_status: str | None
    to_status: str
    cause: str
    at: str


def target_urls(settings: Settings) -> tuple[str, ...]:
    """Return the status webhook URLs, in order; refuse any that is not http(s)."""
    urls = tuple(dict.fromkeys(settings.HOOKLINE_STATUS_WEBHOOK_URLS.split()))
    for position, url in enumerate(urls, start=1):
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 -- raises ValueError for a malformed port
            usable = parts.scheme in {"http", "https"} and bool(parts.hostname)
        except ValueError:
            usable = False
        if not usable:
            raise ConfigError(
                f"HOOKLINE_STATUS_WEBHOOK_URLS: entry {position} is not an http:// "
                "or https:// URL with a host; status events can only be POSTed "
                "over HTTP."
            )
    return urls


@cache
def configured_targets() -> tuple[str, ...]:
    """Return this process's status webhook URLs, read once from the environment."""
    return target_urls(load_settings())


def redacted(url: str) -> str:
    """Name a target in logs: its origin and a digest, never its path or query.

    Receivers often carry a token in the path or query of their URL.
    """
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    digest = hashlib.sha256(url.encode()).hexdigest()[:8]
    return f"{parts.scheme}://{parts.hostname}{port} ({digest})"


def _conversation(session: Session, conversation_id: uuid.UUID) -> Conversation:
    # Without flushing: lifecycle's callers flush when they commit, and an early
    # flush would raise their integrity errors here instead.
    for pending in session.new:
        if isinstance(pending, Conversation) and pending.id == conversation_id:
            return pending
    with session.no_autoflush:
        conversation = session.get(Conversation, conversation_id)
    if conversation is None:
        raise LookupError(f"conversation {conversation_id} does not exist")
    return conversation


def add_events(
    session: Session,
    conversation_id: uuid.UUID,
    current: ConversationStatus | str | None,
    target: ConversationStatus | str,
    cause: str,
) -> None:
    """Add a pending event per status webhook URL for a transition in `session`."""
    urls = configured_targets()
    if not urls:
        return
    conversation = _conversation(session, conversation_id)
    payload: StatusEventPayload = {
        "event_id": str(uuid.uuid4()),
        "conversation_id": str(conversation_id),
        "repository": conversation.repository,
        "number": conversation.number,
        "from_status": None if current is None else str(current),
        "to_status": str(target),
        "cause": cause[:MAX_CAUSE_CHARS],
        "at": utcnow().isoformat(timespec="microseconds") + "Z",
    }
    # One row per URL, so that a failing receiver holds back no other.
    for url in urls:
        session.add(
            StatusEvent(
                event_id=uuid.UUID(payload["event_id"]),
                conversation_id=conversation_id,
                target_url=url,
                payload=dict(payload),
            )
        )


def encode_batch(payloads: Sequence[StatusEventPayload | dict]) -> bytes:
    """Return the exact body a batch is sent as, and signed over."""
    return json.dumps({"events": list(payloads)}, separators=(",", ":")).encode()


def sign(secret: str, body: bytes) -> str:
    """Return the signature header's value for `body`: sha256=<hex HMAC-SHA256>."""
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def signature_matches(secret: str, body: bytes, header: str | None) -> bool:
    """Tell whether a signature header is `body`'s, as a receiver checks it."""
    return header is not None and hmac.compare_digest(sign(secret, body), header)
