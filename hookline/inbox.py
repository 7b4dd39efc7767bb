"""The inbox: every accepted delivery, stored before the gateway answers 2xx.

A delivery is a row of `deliveries` from the moment it is accepted, with its
body and the headers that matter, verdict `received`. The classification pool
replaces the verdict (job, ignored, failed) and fills in the action,
installation and repository it reads from the body. A row still `received` a
while later lost its task (a broker that restarted empty, say): beat queues it
again from the stored body. Bodies are dropped after the retention period; the
row, and so the delivery id's claim, stays.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Engine, create_engine, delete, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from hookline.db import driver_url, engine_for, session_scope
from hookline.models import Delivery, Verdict, utcnow

log = logging.getLogger(__name__)

# What a reader of a stored delivery may want besides its body and event.
KEPT_HEADERS = (
    "X-GitHub-Delivery",
    "X-GitHub-Event",
    "X-GitHub-Hook-ID",
    "X-GitHub-Hook-Installation-Target-ID",
    "X-GitHub-Hook-Installation-Target-Type",
    "User-Agent",
)


def gateway_engine(database_url: str, connections: int) -> Engine:
    """Return an engine that gives up in about two seconds, for the request path.

    GitHub waits ten seconds for an answer; a database that hangs must cost a
    503, not a timeout.
    """
    url = driver_url(database_url)
    if url.startswith("sqlite"):
        return engine_for(database_url)
    return create_engine(
        url,
        pool_size=connections,
        max_overflow=0,
        pool_timeout=2,
        pool_pre_ping=False,
        connect_args={
            "connect_timeout": 2,
            "options": "-c statement_timeout=2000 -c lock_timeout=1000",
        },
    )


class InboxUnavailable(Exception):
    """The database did not take the delivery."""


# The request path's one write, as plain SQL on the driver's connection:
# SQLAlchemy's insert cost 1 ms of CPU each here, the driver's 0.16 ms.
_STORE = (
    "INSERT INTO deliveries (delivery_id, event, verdict, reason, body, headers,"
    " created_at, updated_at) VALUES ({0}, {0}, {0}, '', {0}, {0}, {0}, {0})"
    " ON CONFLICT (delivery_id) DO NOTHING"
)
_STORE_PYFORMAT = _STORE.format("%s")
_STORE_QMARK = _STORE.format("?")


class Inbox:
    """Store and forget deliveries from the gateway, on its own engine."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        qmark = engine.dialect.paramstyle == "qmark"
        self._store_sql = _STORE_QMARK if qmark else _STORE_PYFORMAT
        self._driver_error = engine.dialect.loaded_dbapi.Error

    def store(
        self, delivery_id: str, event: str, body: str, headers: dict[str, str]
    ) -> bool:
        """Store a delivery; False if its id is already in the inbox.

        Raises InboxUnavailable when the database does not take it.
        """
        now = utcnow()
        values = (delivery_id, event, Verdict.RECEIVED.value, body, json.dumps(headers))
        try:
            connection = self._engine.raw_connection()
        except (SQLAlchemyError, self._driver_error) as exc:
            raise InboxUnavailable(type(exc).__name__) from exc
        try:
            cursor = connection.cursor()
            cursor.execute(self._store_sql, (*values, now, now))
            stored = cursor.rowcount == 1
            cursor.close()
            connection.commit()
        except self._driver_error as exc:
            connection.invalidate()
            raise InboxUnavailable(type(exc).__name__) from exc
        finally:
            connection.close()
        return stored

    def forget(self, delivery_id: str) -> None:
        """Delete a delivery the gateway stored but could not queue (it answers 503)."""
        with self._engine.begin() as connection:
            connection.execute(
                delete(Delivery).where(
                    Delivery.delivery_id == delivery_id,
                    Delivery.verdict == Verdict.RECEIVED.value,
                )
            )


@dataclass(frozen=True)
class Stored:
    """A delivery as the inbox keeps it."""

    delivery_id: str
    event: str
    body: str | None


def unclassified(database_url: str, older_than: float, limit: int) -> list[Stored]:
    """Return deliveries still `received` after `older_than` seconds, oldest first."""
    before = utcnow() - timedelta(seconds=older_than)
    query = (
        select(Delivery.delivery_id, Delivery.event, Delivery.body)
        .where(Delivery.verdict == Verdict.RECEIVED.value, Delivery.created_at < before)
        .order_by(Delivery.id)
        .limit(limit)
    )
    with session_scope(database_url) as session:
        return [Stored(*row) for row in session.execute(query)]


def stored(database_url: str, delivery_id: str) -> Stored | None:
    """Return one stored delivery, body included, or None."""
    query = select(Delivery.delivery_id, Delivery.event, Delivery.body).where(
        Delivery.delivery_id == delivery_id
    )
    with session_scope(database_url) as session:
        row = session.execute(query).one_or_none()
    return Stored(*row) if row else None


def store_copy(database_url: str, original: Stored, copy_id: str) -> None:
    """Store a replay of `original` under a new delivery id."""
    now = utcnow()
    with session_scope(database_url) as session:
        session.execute(
            insert(Delivery).values(
                delivery_id=copy_id,
                event=original.event,
                verdict=Verdict.RECEIVED.value,
                reason="",
                body=original.body,
                headers={"X-Hookline-Replay-Of": original.delivery_id},
                created_at=now,
                updated_at=now,
            )
        )


def drop_old_bodies(database_url: str, retention: float, limit: int) -> int:
    """Drop bodies and headers older than `retention` seconds; keep the rows."""
    before = utcnow() - timedelta(seconds=retention)
    with session_scope(database_url) as session:
        ids = select(Delivery.id).where(
            Delivery.created_at < before, Delivery.body.is_not(None)
        )
        return session.execute(
            update(Delivery)
            .where(Delivery.id.in_(ids.limit(limit)))
            .values(body=None, headers=None)
        ).rowcount


def give_up(database_url: str, delivery_ids: list[str], reason: str) -> None:
    """Record deliveries that can no longer be classified as failed."""
    if not delivery_ids:
        return
    with session_scope(database_url) as session:
        session.execute(
            update(Delivery)
            .where(
                Delivery.delivery_id.in_(delivery_ids),
                Delivery.verdict == Verdict.RECEIVED.value,
            )
            .values(verdict=Verdict.FAILED.value, reason=reason)
        )
