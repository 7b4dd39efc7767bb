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
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, insert, select, update
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
            # A server gone without a word (a NAT that dropped the connection)
            # is noticed in seconds, not at the system's TCP defaults.
            "keepalives_idle": 5,
            "keepalives_interval": 2,
            "keepalives_count": 2,
            "tcp_user_timeout": 5000,
        },
    )


# A body as the gateway has it: text, or the UTF-8 bytes of a large one.
Body = str | bytes | bytearray
T = TypeVar("T")


class InboxUnavailable(Exception):
    """The database did not take the delivery."""


# The request path's one write, as plain SQL on the driver's connection:
# SQLAlchemy's insert cost 1 ms of CPU each here, the driver's 0.16 ms. One
# statement stores a whole batch of the gateway's deliveries (webhook_gateway/
# intake.py) and names the ones that were new.
_INSERT = (
    "INSERT INTO deliveries (delivery_id, event, verdict, reason, body, headers,"
    " created_at, updated_at) VALUES "
)
_ROW = "({0}, {0}, {0}, {0}, {0}, {0}, {0}, {0})"
_ON_CONFLICT = " ON CONFLICT (delivery_id) DO NOTHING RETURNING delivery_id"


class Inbox:
    """Store and forget deliveries from the gateway, on its own engine."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._copies = engine.dialect.driver == "psycopg2"
        marker = "?" if engine.dialect.paramstyle == "qmark" else "%s"
        self._row = _ROW.format(marker)
        self._marker = marker
        self._driver_error = engine.dialect.loaded_dbapi.Error

    def store(
        self, delivery_id: str, event: str, body: Body, headers: dict[str, str]
    ) -> bool:
        """Store a delivery; False if its id is already in the inbox.

        Raises InboxUnavailable when the database does not take it.
        """
        return bool(self.store_many([(delivery_id, event, body, headers)]))

    def store_many(
        self, deliveries: list[tuple[str, str, Body, dict[str, str]]]
    ) -> set[str]:
        """Store (delivery id, event, body, headers) rows in one transaction.

        Returns the ids stored; an id already in the inbox is left as it was.
        Raises InboxUnavailable when the database does not take them.

        On PostgreSQL the rows are streamed with one binary COPY: no body is
        escaped into a query, a 25 MB one included. COPY knows no ON CONFLICT,
        so a batch holding an id already stored (rare: Redis's claim caught it
        first, unless the claim had expired) is stored again row by row.
        """
        now = utcnow()
        received = Verdict.RECEIVED.value
        rows = [
            (delivery_id, event, received, "", body, json.dumps(headers), now, now)
            for delivery_id, event, body, headers in deliveries
        ]
        if not self._copies:
            return self._run(lambda cursor: self._insert(cursor, rows))

        def store(cursor: Any) -> set[str]:
            from psycopg2.errors import UniqueViolation

            try:
                _copy(cursor, rows)
            except UniqueViolation:
                cursor.connection.rollback()
                return {row[0] for row in rows if _copy_unless_stored(cursor, row)}
            return {row[0] for row in rows}

        return self._run(store)

    def _insert(self, cursor: Any, rows: list[tuple[object, ...]]) -> set[str]:
        values: list[object] = []
        for row in rows:
            body = row[4]
            text = body.decode() if isinstance(body, bytes | bytearray) else body
            values += (*row[:4], text, *row[5:])
        statement = _INSERT + ", ".join([self._row] * len(rows)) + _ON_CONFLICT
        cursor.execute(statement, values)
        return {stored[0] for stored in cursor.fetchall()}

    def known(self, delivery_ids: list[str]) -> set[str]:
        """Return which of these delivery ids the inbox holds.

        Raises InboxUnavailable when the database does not answer.
        """
        statement = (
            "SELECT delivery_id FROM deliveries"  # noqa: S608 (placeholders only)
            f" WHERE delivery_id IN ({self._markers(len(delivery_ids))})"
        )

        def select(cursor: Any) -> set[str]:
            cursor.execute(statement, delivery_ids)
            return {row[0] for row in cursor.fetchall()}

        return self._run(select)

    def forget(self, delivery_ids: list[str]) -> None:
        """Delete deliveries the gateway stored but could not queue (it answers 503).

        Raises InboxUnavailable when the database does not answer.
        """
        statement = (
            f"DELETE FROM deliveries WHERE verdict = {self._marker}"  # noqa: S608 (placeholders only)
            f" AND delivery_id IN ({self._markers(len(delivery_ids))})"
        )
        self._run(
            lambda cursor: cursor.execute(
                statement, [Verdict.RECEIVED.value, *delivery_ids]
            )
        )

    def _markers(self, count: int) -> str:
        """Return `count` placeholders for an IN list: the values are parameters."""
        return ", ".join([self._marker] * count)

    def _run(self, work: Callable[[Any], T]) -> T:
        """Run `work(cursor)` in one transaction on a pooled driver connection.

        A pooled connection the server had already closed (a restart, an idle
        timeout, a terminated backend) fails before anything is written: the
        work is done once more on a new connection. A failure during the commit
        is not retried: the rows may be there.
        """
        for attempt in (1, 2):
            try:
                connection = self._engine.raw_connection()
            except (SQLAlchemyError, self._driver_error) as exc:
                raise InboxUnavailable(str(exc) or type(exc).__name__) from exc
            committing = False
            try:
                cursor = connection.cursor()
                result = work(cursor)
                cursor.close()
                committing = True
                connection.commit()
                return result
            except self._driver_error as exc:
                stale = not committing and _lost(connection)
                connection.invalidate()
                if not stale or attempt == 2:
                    raise InboxUnavailable(str(exc) or type(exc).__name__) from exc
                log.warning("inbox.stale_connection", extra={"error": str(exc)[:200]})
            finally:
                connection.close()
        raise AssertionError("unreachable")


def _lost(connection: Any) -> bool:
    """Whether psycopg2 found its connection gone (sqlite3 never says so)."""
    return bool(getattr(connection.dbapi_connection, "closed", 0))


# COPY's binary format (PostgreSQL's "COPY" page): a signature, flags and an
# empty extension area; then per row a field count and each field's length and
# bytes (text and json as UTF-8, timestamps as microseconds since 2000); -1 ends.
_COPY = (
    "COPY deliveries (delivery_id, event, verdict, reason, body, headers,"
    " created_at, updated_at) FROM STDIN WITH (FORMAT binary)"
)
_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
_POSTGRES_EPOCH = datetime(2000, 1, 1)
_TIMESTAMP = struct.pack("!i", 8)
_COPY_CHUNK = 1 << 20


def _copy(cursor: Any, rows: list[tuple[object, ...]]) -> None:
    """COPY rows into deliveries; a delivery id already there fails them all."""
    cursor.copy_expert(_COPY, _Pieces(_binary_rows(rows)), size=_COPY_CHUNK)


def _copy_unless_stored(cursor: Any, row: tuple[object, ...]) -> bool:
    """COPY one row; False, and nothing else undone, if its id is already there."""
    from psycopg2.errors import UniqueViolation

    cursor.execute("SAVEPOINT hookline_copy")
    try:
        _copy(cursor, [row])
    except UniqueViolation:
        cursor.execute("ROLLBACK TO SAVEPOINT hookline_copy")
        return False
    cursor.execute("RELEASE SAVEPOINT hookline_copy")
    return True


def _binary_rows(rows: list[tuple[object, ...]]) -> Iterator[bytes | bytearray]:
    """Yield COPY's binary data for `rows`: small fields gathered, large ones apart."""
    gathered = bytearray(_COPY_SIGNATURE)
    for row in rows:
        gathered += struct.pack("!h", len(row))
        for value in row:
            if isinstance(value, datetime):
                microseconds = (value - _POSTGRES_EPOCH) // timedelta(microseconds=1)
                gathered += _TIMESTAMP
                gathered += struct.pack("!q", microseconds)
                continue
            data = value.encode() if isinstance(value, str) else value
            assert isinstance(data, bytes | bytearray)
            gathered += struct.pack("!i", len(data))
            if len(data) < _COPY_CHUNK:
                gathered += data
            else:
                yield gathered
                yield data
                gathered = bytearray()
    gathered += struct.pack("!h", -1)
    yield gathered


class _Pieces:
    """A file to read the pieces from, a chunk at a time, without joining them all.

    Small pieces are joined into one chunk; a large one is sliced.
    """

    def __init__(self, pieces: Iterator[bytes | bytearray]) -> None:
        self._pieces = pieces
        self._current = memoryview(b"")

    def read(self, size: int = -1) -> bytes:
        wanted = size if size > 0 else _COPY_CHUNK
        parts = []
        while wanted > 0:
            if not self._current:
                piece = next(self._pieces, None)
                if piece is None:
                    break
                self._current = memoryview(piece)
            part, self._current = self._current[:wanted], self._current[wanted:]
            parts.append(part)
            wanted -= len(part)
        return b"".join(parts)


@dataclass(frozen=True)
class Stored:
    """A delivery as the inbox keeps it."""

    delivery_id: str
    event: str
    body: str | None


@dataclass(frozen=True)
class Unclassified:
    """A delivery still waiting for its verdict; its body stays in the inbox."""

    delivery_id: str
    event: str
    has_body: bool


def unclassified(
    database_url: str, older_than: float, limit: int
) -> list[Unclassified]:
    """Return deliveries still `received` after `older_than` seconds, oldest first."""
    before = utcnow() - timedelta(seconds=older_than)
    query = (
        select(Delivery.delivery_id, Delivery.event, Delivery.body.is_not(None))
        .where(Delivery.verdict == Verdict.RECEIVED.value, Delivery.created_at < before)
        .order_by(Delivery.id)
        .limit(limit)
    )
    with session_scope(database_url) as session:
        return [Unclassified(*row) for row in session.execute(query)]


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
