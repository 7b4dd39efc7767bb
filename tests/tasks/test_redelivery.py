"""Deliveries GitHub failed to make are asked for again, once, and only those."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from tasks.redelivery import failed_guids
from tests.conftest import SECRET, Stack, fixture_bytes
from tests.test_pipeline import callback_of, verdict_of
from webhook_gateway.app import EVENTS_PATH
from workers.celery_app import REDELIVER_TASK, create_celery

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def attempt(id_: int, guid: str, status_code: int, hours_ago: float = 1) -> dict:
    moment = NOW - timedelta(hours=hours_ago)
    return {
        "id": id_,
        "guid": guid,
        "status_code": status_code,
        "delivered_at": moment.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def test_only_deliveries_that_never_succeeded_count_as_failed() -> None:
    newest_first = [
        attempt(5, "redelivered-ok", 202, hours_ago=0.5),
        attempt(4, "still-failing", 502),
        attempt(3, "redelivered-ok", 503),
        attempt(2, "fine", 202),
        attempt(1, "timed-out", 0),
    ]

    assert failed_guids(newest_first, NOW) == {"still-failing": 4, "timed-out": 1}


def test_deliveries_past_githubs_window_are_left_alone() -> None:
    newest_first = [attempt(2, "recent", 500), attempt(1, "old", 500, hours_ago=80)]

    assert failed_guids(newest_first, NOW) == {"recent": 2}


def test_failed_delivery_is_redelivered_and_answered(running: Stack) -> None:
    fake = running.fake
    fake.redeliver_to(running.gateway_url + EVENTS_PATH, SECRET)
    lost = str(uuid.uuid4())
    fake.add_hook_delivery(
        lost, "issue_comment", 502, fixture_bytes("issue_comment.created.json")
    )
    delivered, _ = running.send("issues.labeled.json", "issues")
    verdict_of(running, delivered)
    # Failed at GitHub's end too, but Hookline has it: no need to ask again.
    fake.add_hook_delivery(
        delivered, "issues", 504, fixture_bytes("issues.labeled.json")
    )

    create_celery(running.settings).send_task(REDELIVER_TASK)

    assert callback_of(running, lost).status == "posted"
    attempts = fake.requests("POST", "/attempts")
    assert len(attempts) == 1
    assert attempts[0].status == 202
    assert len(fake.comments()) == 2  # the labeled issue's, and the redelivered one
