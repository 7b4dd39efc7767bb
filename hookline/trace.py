"""Each GitHub call a task makes, kept with its delivery for `hookline explain`.

Calls are noted in memory while a task runs and written in one insert when it
ends (retries included: a 502 that was retried is part of the story). Writing
the trace never fails a task: a database that does not answer costs the trace,
not the work.
"""

from __future__ import annotations

import contextvars
import logging
from dataclasses import asdict, dataclass

from sqlalchemy import insert
from sqlalchemy.exc import SQLAlchemyError

from hookline.db import engine_for
from hookline.models import GitHubCall, utcnow

log = logging.getLogger(__name__)

# Enough for any task Hookline has; a runaway loop does not fill the table.
MAX_CALLS_PER_TASK = 200


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    status: int  # 0: no answer came back
    milliseconds: int


_calls: contextvars.ContextVar[list[Call] | None] = contextvars.ContextVar(
    "github_calls", default=None
)


def begin() -> None:
    """Start noting this task's calls."""
    _calls.set([])


def note(method: str, path: str, status: int | None, seconds: float) -> None:
    """Note one call, if a task is noting them."""
    calls = _calls.get()
    if calls is not None and len(calls) < MAX_CALLS_PER_TASK:
        calls.append(Call(method.upper(), path, status or 0, round(seconds * 1000)))


def end(database_url: str, delivery_id: str, task: str) -> int:
    """Write the noted calls for `delivery_id`, stop noting; return how many."""
    calls = _calls.get()
    _calls.set(None)
    if not calls or delivery_id in {"", "-"}:
        return 0
    at = utcnow()
    rows = [
        {**asdict(call), "delivery_id": delivery_id, "task": task, "at": at}
        for call in calls
    ]
    # A Core insert on a connection: the ORM session and its bulk-insert path
    # cost more than the statement itself, three times a job.
    try:
        with engine_for(database_url).begin() as connection:
            connection.execute(insert(GitHubCall.__table__), rows)
    except SQLAlchemyError as exc:
        log.warning("trace.not_written", extra={"error": type(exc).__name__})
        return 0
    return len(rows)
