"""Log lines: JSON for collectors, key=value for people, ids on every line."""

from __future__ import annotations

import json
import logging

from config.logging import (
    ContextFilter,
    JsonFormatter,
    KeyValueFormatter,
    bind,
    bound_delivery,
    forwarded,
    unbind_all,
)


def formatted(formatter: logging.Formatter, **extra: object) -> str:
    record = logging.LogRecord(
        "tasks.callbacks", logging.INFO, "", 0, "callback.posted", None, None
    )
    for name, value in extra.items():
        setattr(record, name, value)
    ContextFilter().filter(record)
    return formatter.format(record)


def test_json_line_carries_the_bound_ids_and_the_fields() -> None:
    with bound_delivery("d-1", "t-1"):
        line = json.loads(formatted(JsonFormatter(), comment=7, path="/x"))

    assert line["message"] == "callback.posted"
    assert (line["delivery"], line["task"]) == ("d-1", "t-1")
    assert (line["comment"], line["path"]) == (7, "/x")
    assert line["level"] == "INFO"


def test_text_line_names_the_delivery_only_when_one_is_bound() -> None:
    with bound_delivery("d-2"):
        bound = formatted(KeyValueFormatter(), comment=7)
    unbound = formatted(KeyValueFormatter())

    assert "callback.posted delivery=d-2 comment=7" in bound
    assert "delivery=" not in unbound


def test_celerys_task_payload_is_never_written() -> None:
    record = logging.LogRecord(
        "celery.worker.strategy", logging.INFO, "", 0, "Task received", None, None
    )
    record.data = {"kwargs": {"body": "the whole delivery"}}
    ContextFilter().filter(record)

    assert "the whole delivery" not in JsonFormatter().format(record)
    assert "the whole delivery" not in KeyValueFormatter().format(record)


def test_bound_event_and_installation_are_written_and_forwarded() -> None:
    with bound_delivery("d-3", "t-3", event="issue_comment"):
        bind(installation=4001)
        line = json.loads(formatted(JsonFormatter()))
        text = formatted(KeyValueFormatter())
        carried = forwarded()
    unbind_all()

    assert (line["event"], line["installation"]) == ("issue_comment", "4001")
    assert "delivery=d-3 event=issue_comment installation=4001 task=t-3" in text
    assert carried == {"github_event": "issue_comment", "installation": "4001"}
    assert forwarded() == {}


def test_a_lines_own_event_field_wins_over_the_bound_one() -> None:
    with bound_delivery("d-4", event="issue_comment"):
        line = json.loads(formatted(JsonFormatter(), event="finished"))
        text = formatted(KeyValueFormatter(), event="finished")

    assert line["event"] == "finished"
    assert "event=issue_comment" not in text
    assert "event='finished'" in text
