"""Log lines as a stable event key followed by key=value fields.

Every line written while a delivery is being handled carries its delivery id,
its GitHub event and installation once known and, inside a worker, the Celery
task id: each is bound once in a context variable, and a task queued from
inside another carries the event and installation on (`forwarded()`).
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

delivery_id_var: contextvars.ContextVar[str] = contextvars.ContextVar(
    "delivery_id", default="-"
)
task_id_var: contextvars.ContextVar[str] = contextvars.ContextVar(
    "task_id", default="-"
)
event_var: contextvars.ContextVar[str] = contextvars.ContextVar("event", default="-")
installation_var: contextvars.ContextVar[str] = contextvars.ContextVar(
    "installation", default="-"
)
# Bound name, then the field it is written as.
_BOUND = (
    ("delivery_id", "delivery"),
    ("github_event", "event"),
    ("installation", "installation"),
    ("task_id", "task"),
)

# Attributes every LogRecord has; anything else came in through `extra=`.
_RECORD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "delivery_id",
    "task_id",
    "github_event",
    "installation",
}


class ContextFilter(logging.Filter):
    """Stamp each record with the delivery, event, installation and task bound."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.delivery_id = delivery_id_var.get()
        record.task_id = task_id_var.get()
        # A line may name the event itself (`extra={"event": ...}`); the bound
        # one is the same delivery's, so the line's own is kept.
        if "installation" not in vars(record):
            record.installation = installation_var.get()
        record.github_event = event_var.get()
        return True


def bind(event: str | None = None, installation: object = None) -> None:
    """Bind the GitHub event and installation once the code handling it knows them.

    Inside a Celery task they are unbound when the task ends.
    """
    if event:
        event_var.set(str(event))
    if installation is not None:
        installation_var.set(str(installation))


def forwarded() -> dict[str, str]:
    """Return the bound event and installation, as kwargs for a task queued next."""
    context = {"github_event": event_var.get(), "installation": installation_var.get()}
    return {name: value for name, value in context.items() if value != "-"}


def _fields(record: logging.LogRecord) -> dict[str, object]:
    """Return what the caller passed in `extra=`."""
    fields = {
        key: value
        for key, value in vars(record).items()
        if key not in _RECORD_ATTRS and not key.startswith("_")
    }
    if record.name.startswith("celery"):
        # Celery attaches the whole task (payload included) as `data`; its
        # message already names the task and its id.
        fields.pop("data", None)
    return fields


class JsonFormatter(logging.Formatter):
    """Format one JSON object a line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "at": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            # The stable event key; "event" is left to fields such as GitHub's event.
            "message": record.getMessage(),
        }
        for name, field in _BOUND:
            value = getattr(record, name, "-")
            if value != "-":
                line[field] = value
        line.update(_fields(record))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class KeyValueFormatter(logging.Formatter):
    """Format `event key=value ...`, the ids first, then the `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        fields = _fields(record)
        parts = [
            self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            record.levelname,
            record.name,
            record.getMessage(),
        ]
        for name, field in _BOUND:
            value = getattr(record, name, "-")
            if value != "-" and field not in fields:
                parts.append(f"{field}={value}")
        parts.extend(f"{key}={value!r}" for key, value in fields.items())
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(level: str = "INFO", style: str = "auto") -> None:
    """Send every logger's lines to stderr: JSON, or `key=value` text.

    `auto` writes text to a terminal and JSON anywhere else (files, collectors).
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    if style == "auto":
        style = "text" if sys.stderr.isatty() else "json"
    handler.setFormatter(JsonFormatter() if style == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


@contextmanager
def bound_delivery(
    delivery_id: str, task_id: str | None = None, event: str | None = None
) -> Iterator[None]:
    """Bind a delivery id (and task id, event) to every log line inside the block."""
    delivery_token = delivery_id_var.set(delivery_id)
    task_token = task_id_var.set(task_id) if task_id else None
    event_token = event_var.set(event) if event else None
    try:
        yield
    finally:
        delivery_id_var.reset(delivery_token)
        if task_token is not None:
            task_id_var.reset(task_token)
        if event_token is not None:
            event_var.reset(event_token)


def unbind_all() -> None:
    """Forget everything bound: a worker's task is over."""
    for variable in (delivery_id_var, task_id_var, event_var, installation_var):
        variable.set("-")
