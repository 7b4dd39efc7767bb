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

import logging
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Engine, create_engine, delete, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

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


class Inbox:
    """Store and forget deliveries from the gateway, on its own engine."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        dialect = engine.dialect.name
        self._insert = pg_insert if dialect == "postgresql" else sqlite_insert

    def store(
        self, delivery_id: str, event: str, body: str, headers: dict[str, str]
    ) -> bool:
        """Store a delivery; False if its id is already in the inbox."""
        now = utcnow()
        statement = (
            self._insert(Delivery)
            .values(
                delivery_id=delivery_id,
                event=event,
                verdict=Verdict.RECEIVED.value,
                reason="",
                body=body,
                headers=headers,
                created_at=now,
                updated_at=now,
            )
            .on_conflict_do_nothing(index_elements=["delivery_id"])
        )
        with self._engine.begin() as connection:
            return connection.execute(statement).rowcount == 1

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
