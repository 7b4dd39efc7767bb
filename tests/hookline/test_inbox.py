"""The inbox on real PostgreSQL: what the sweep finds, requeues, gives up, drops."""

from __future__ import annotations

import json
import time
import uuid
from datetime import timedelta

from sqlalchemy import select, update

from hookline import inbox
from hookline.db import engine_for, session_scope
from hookline.models import Delivery, utcnow
from tests.conftest import Stack, fixture_bytes
from tests.test_pipeline import verdict_of
from workers.celery_app import CLASSIFY_TASK, SWEEP_INBOX_TASK, create_celery


def received(database_url: str, body: str | None = "{}", age: float = 0) -> str:
    """Store a delivery as the gateway does, `age` seconds old; return its id."""
    delivery_id = str(uuid.uuid4())
    store = inbox.Inbox(engine_for(database_url))
    assert store.store(delivery_id, "issue_comment", body or "{}", {"X-A": "1"})
    with session_scope(database_url) as session:
        session.execute(
            update(Delivery)
            .where(Delivery.delivery_id == delivery_id)
            .values(
                created_at=utcnow() - timedelta(seconds=age),
                body=body,
            )
        )
    return delivery_id


def verdict(database_url: str, delivery_id: str) -> tuple[str, str]:
    with session_scope(database_url) as session:
        row = session.scalars(
            select(Delivery).where(Delivery.delivery_id == delivery_id)
        ).one()
        return row.verdict, row.reason


def test_storing_an_id_twice_is_refused_the_second_time(database_url: str) -> None:
    store = inbox.Inbox(engine_for(database_url))
    delivery_id = str(uuid.uuid4())

    assert store.store(delivery_id, "issues", "{}", {}) is True
    assert store.store(delivery_id, "issues", '{"other": 1}', {}) is False
    assert inbox.stored(database_url, delivery_id).body == "{}"


def test_only_deliveries_left_unclassified_long_enough_are_found(
    database_url: str,
) -> None:
    old = received(database_url, age=600)
    fresh = received(database_url, age=0)

    found = {d.delivery_id for d in inbox.unclassified(database_url, 120, 10_000)}

    assert old in found
    assert fresh not in found


def test_bodies_past_retention_are_dropped_and_their_rows_kept(
    database_url: str,
) -> None:
    old = received(database_url, body='{"a": 1}', age=3600)
    young = received(database_url, body='{"b": 2}', age=10)

    inbox.drop_old_bodies(database_url, retention=60, limit=10_000)

    assert inbox.stored(database_url, old).body is None
    assert inbox.stored(database_url, young).body == '{"b": 2}'


def test_a_lost_task_is_classified_after_the_sweep(running: Stack) -> None:
    url = running.settings.DATABASE_URL
    payload = json.loads(fixture_bytes("issue_comment.created.json"))
    payload["issue"]["number"] = 4242
    # A day old, so that the sweep, oldest first, comes to them whatever other
    # tests left unclassified in this session's database.
    lost = received(url, body=json.dumps(payload), age=86_400)
    gone = received(url, body=None, age=86_400)

    create_celery(running.settings).send_task(SWEEP_INBOX_TASK)

    assert verdict_of(running, lost).verdict == "job"
    assert running.fake.wait_for(
        lambda fake: any(
            "test agent finished octo-user/Hello-World#4242" in c["body"]
            for c in fake.comments()
        ),
        timeout=30,
    )
    assert verdict(url, gone) == (
        "failed",
        "its task was lost and its body is past retention",
    )


def test_a_batch_holding_a_stored_id_stores_only_the_new_ones(database_url) -> None:
    store = inbox.Inbox(engine_for(database_url))
    known, new, large = (str(uuid.uuid4()) for _ in range(3))
    assert store.store(known, "issue_comment", '{"first": 1}', {})

    stored = store.store_many(
        [
            (
                new,
                "issue_comment",
                '{"a": "tab\\there, quote \\" and é"}',
                {"X-A": "1"},
            ),
            (known, "issue_comment", '{"second": 2}', {}),
            (large, "push", b'{"big": "' + b"x" * 300_000 + b'"}', {}),
        ]
    )

    assert stored == {new, large}
    assert inbox.stored(database_url, known).body == '{"first": 1}'
    assert (
        inbox.stored(database_url, new).body == '{"a": "tab\\there, quote \\" and é"}'
    )
    assert len(inbox.stored(database_url, large).body) == 300_011


def test_a_message_for_a_delivery_the_inbox_forgot_records_nothing(
    running: Stack,
) -> None:
    # The gateway answered 503 and forgot the row, but its by-reference push
    # reached the broker: the id must stay free for GitHub's redelivery.
    delivery_id = str(uuid.uuid4())
    create_celery(running.settings).send_task(
        CLASSIFY_TASK, kwargs={"delivery_id": delivery_id, "event": "issues"}
    )

    deadline = time.monotonic() + 30
    while not any(
        record.get("message") == "delivery.not_in_inbox"
        and record.get("delivery") == delivery_id
        for record in running.log_records()
    ):
        assert time.monotonic() < deadline, "classify never took the message"
        time.sleep(0.2)
    assert inbox.stored(running.settings.DATABASE_URL, delivery_id) is None


def test_a_connection_the_server_closed_is_replaced_not_refused(database_url) -> None:
    from hookline.inbox import gateway_engine

    engine = gateway_engine(database_url, 1)
    store = inbox.Inbox(engine)
    assert store.store(str(uuid.uuid4()), "issue_comment", "{}", {})
    with engine.connect() as connection:
        pid = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    with engine_for(database_url).connect() as admin:
        admin.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})")

    delivery_id = str(uuid.uuid4())

    assert store.store(delivery_id, "issue_comment", '{"after": 1}', {})
    assert inbox.stored(database_url, delivery_id).body == '{"after": 1}'
