"""Engines and sessions, one engine per database URL and process."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker


def driver_url(url: str) -> str:
    """Name psycopg2 as the driver of a bare PostgreSQL URL.

    Heroku hands out `postgres://`, and SQLAlchemy 2.1 reads a bare
    `postgresql://` as psycopg 3, which Hookline does not install.
    """
    for bare in ("postgres://", "postgresql://"):
        if url.startswith(bare):
            return "postgresql+psycopg2://" + url[len(bare) :]
    return url


@cache
def engine_for(url: str) -> Engine:
    """Return this process's engine for `url`."""
    url = driver_url(url)
    if url.startswith("sqlite"):
        # The embedded default is shared by several worker processes: wait for the
        # file lock instead of failing, and let readers run beside one writer.
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _wal(connection, _record) -> None:  # type: ignore[no-untyped-def]
            connection.execute("PRAGMA journal_mode=WAL")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


@cache
def _sessions(url: str) -> sessionmaker[Session]:
    return sessionmaker(engine_for(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """Yield a session that commits when the block ends and rolls back on error."""
    session = _sessions(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
