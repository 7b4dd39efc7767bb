"""The intake on real Redis and PostgreSQL: batches, what each step's failure undoes.

A batch is formed by holding the intake's thread inside a first claim while more
deliveries arrive: they then go together, whatever the machine's timing.
"""

from __future__ import annotations

import json
import threading
import uuid

import pytest
import redis
from sqlalchemy import select

from hookline import inbox
from hookline.db import session_scope
from hookline.inbox import Inbox, gateway_engine
from hookline.models import Delivery
from tests.conftest import PREFIX, SECRET, fixture_bytes
from tests.webhook_gateway.conftest import gateway, queued
from tests.webhook_gateway.test_app import post
from webhook_gateway.app import BY_REFERENCE_OVER
from webhook_gateway.dedup import Claim, Deduplicator, body_digest
from webhook_gateway.intake import Arrival, Intake, Outcome
from webhook_gateway.signature import sign

BODY = fixture_bytes("issue_comment.created.json").decode()


class HeldDeduplicator(Deduplicator):
    """The real claims, with the first batch held until the test lets it go."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(client, 60, 60, PREFIX)
        self.entered = threading.Event()
        self.release_first = threading.Event()
        self.batches: list[int] = []

    def claim_many(
        self, deliveries: list[tuple[str, str]]
    ) -> list[tuple[Claim, list[str]]]:
        self.batches.append(len(deliveries))
        if len(self.batches) == 1:
            self.entered.set()
            assert self.release_first.wait(10)
        return super().claim_many(deliveries)


def arrival(delivery_id: str | None = None, body: str | None = None) -> Arrival:
    body = body or json.dumps({"hookline_test": str(uuid.uuid4())})
    return Arrival(
        delivery_id or str(uuid.uuid4()),
        "issue_comment",
        body,
        body_digest(body.encode()),
        {"X-GitHub-Event": "issue_comment"},
    )


def take_all(
    intake: Intake, arrivals: list[Arrival]
) -> tuple[list[Outcome | None], list[threading.Thread]]:
    """Hand each arrival to the intake from a thread of its own; return outcomes."""
    outcomes: list[Outcome | None] = [None] * len(arrivals)

    def take(index: int) -> None:
        outcomes[index] = intake.take(arrivals[index])

    threads = [threading.Thread(target=take, args=(n,)) for n in range(len(arrivals))]
    for thread in threads:
        thread.start()
    return outcomes, threads


@pytest.fixture
def held(redis_client: redis.Redis) -> HeldDeduplicator:
    return HeldDeduplicator(redis_client)


def stored_ids(database_url: str, ids: list[str]) -> set[str]:
    with session_scope(database_url) as session:
        return set(
            session.scalars(
                select(Delivery.delivery_id).where(Delivery.delivery_id.in_(ids))
            )
        )


def test_deliveries_waiting_behind_a_batch_go_together(held, database_url) -> None:
    pushed: list[list[str]] = []
    intake = Intake(
        held,
        Inbox(gateway_engine(database_url, 2)),
        lambda arrivals: pushed.append([a.delivery_id for a in arrivals]) or [],
    )
    first = arrival()
    rest = [arrival() for _ in range(5)]

    _, lone_threads = take_all(intake, [first])
    assert held.entered.wait(10)
    outcomes, threads = take_all(intake, rest)
    # All five are waiting before the first batch is let go.
    for _ in range(100):
        if len(intake._waiting) == 5:
            break
        threading.Event().wait(0.02)
    held.release_first.set()
    for thread in [*lone_threads, *threads]:
        thread.join(10)

    assert held.batches == [1, 5]
    assert pushed == [[first.delivery_id], [a.delivery_id for a in rest]]
    assert first.outcome is Outcome.QUEUED
    assert outcomes == [Outcome.QUEUED] * 5
    everything = [first.delivery_id, *(a.delivery_id for a in rest)]
    assert stored_ids(database_url, everything) == set(everything)


def test_a_replay_inside_one_batch_is_queued_once(redis_client, database_url) -> None:
    pushed: list[str] = []
    intake = Intake(
        Deduplicator(redis_client, 60, 60, PREFIX),
        Inbox(gateway_engine(database_url, 2)),
        lambda arrivals: pushed.extend(a.delivery_id for a in arrivals) or [],
    )
    # Ids arrive here in lowercase (the gateway lowers them; test_app.py checks).
    original = arrival()
    replayed = arrival(original.delivery_id, original.body)
    same_body = arrival(body=original.body)

    intake._handle([original, replayed, same_body])

    assert [a.outcome for a in (original, replayed, same_body)] == [
        Outcome.QUEUED,
        Outcome.DUPLICATE,
        Outcome.DUPLICATE,
    ]
    assert pushed == [original.delivery_id]


def test_a_batch_the_database_refuses_leaves_no_claim(redis_client) -> None:
    deduplicator = Deduplicator(redis_client, 60, 60, PREFIX)
    down = Inbox(gateway_engine("postgresql://postgres@127.0.0.1:1/test", 1))
    intake = Intake(deduplicator, down, lambda arrivals: [])
    batch = [arrival(), arrival()]

    intake._handle(batch)

    assert [a.outcome for a in batch] == [Outcome.INBOX_UNAVAILABLE] * 2
    again = deduplicator.claim_many([(a.delivery_id, a.digest) for a in batch])
    assert [claim for claim, _ in again] == [Claim.NEW, Claim.NEW]


def test_a_batch_the_broker_refuses_leaves_no_row_and_no_claim(
    redis_client, database_url
) -> None:
    deduplicator = Deduplicator(redis_client, 60, 60, PREFIX)
    intake = Intake(
        deduplicator, Inbox(gateway_engine(database_url, 2)), lambda arrivals: arrivals
    )
    batch = [arrival(), arrival()]

    intake._handle(batch)

    ids = [a.delivery_id for a in batch]
    assert [a.outcome for a in batch] == [Outcome.QUEUE_UNAVAILABLE] * 2
    assert stored_ids(database_url, ids) == set()
    again = deduplicator.claim_many([(a.delivery_id, a.digest) for a in batch])
    assert [claim for claim, _ in again] == [Claim.NEW, Claim.NEW]


def test_a_delivery_never_taken_in_time_is_dropped_from_the_wait(
    held, database_url
) -> None:
    intake = Intake(held, Inbox(gateway_engine(database_url, 2)), lambda a: [])
    first, late = arrival(), arrival()
    (_,), threads = take_all(intake, [first])
    assert held.entered.wait(10)

    outcome = intake.take(late, wait=0.2)
    held.release_first.set()
    for thread in threads:
        thread.join(10)

    assert outcome is Outcome.TIMED_OUT
    assert held.batches == [1]
    assert stored_ids(database_url, [late.delivery_id]) == set()


def test_a_crash_in_a_batch_answers_its_deliveries(redis_client, database_url):
    def crash(arrivals: list[Arrival]) -> list[Arrival]:
        raise RuntimeError("a bug in the enqueuer")

    intake = Intake(
        Deduplicator(redis_client, 60, 60, PREFIX),
        Inbox(gateway_engine(database_url, 2)),
        crash,
    )

    assert intake.take(arrival(), wait=10) is Outcome.QUEUE_UNAVAILABLE


def large_delivery(size: int) -> bytes:
    payload = json.loads(BODY)
    payload["hookline_test"] = str(uuid.uuid4())
    payload["comment"]["body"] += " é" * (size // 3)
    return json.dumps(payload, ensure_ascii=False).encode()


def test_a_large_delivery_goes_by_reference_through_the_inbox(
    client, broker, database_url, redis_client
) -> None:
    body = large_delivery(BY_REFERENCE_OVER + 1000)
    delivery_id = str(uuid.uuid4())

    response = post(client, body, delivery_id=delivery_id)
    for key in redis_client.scan_iter(f"{PREFIX}delivery:*"):
        redis_client.delete(key)
    for key in redis_client.scan_iter(f"{PREFIX}body:*"):
        redis_client.delete(key)
    replayed = post(client, body, delivery_id=delivery_id)

    assert response.status_code == 202
    # The message names the delivery; the classify pool reads the body stored.
    assert queued(broker) == [{"delivery_id": delivery_id, "event": "issue_comment"}]
    assert inbox.stored(database_url, delivery_id).body == body.decode()
    # Streamed with COPY, the second copy of the id still meets the unique key.
    assert replayed.status_code == 200
    assert replayed.json["status"] == "duplicate"
    assert len(queued(broker)) == 1


def test_a_large_form_encoded_delivery_is_stored_as_its_payload(
    client, broker, database_url
) -> None:
    from urllib.parse import urlencode

    payload = large_delivery(BY_REFERENCE_OVER + 1000)
    body = urlencode({"payload": payload.decode()}).encode()
    delivery_id = str(uuid.uuid4())

    response = post(
        client,
        body,
        delivery_id=delivery_id,
        content_type="application/x-www-form-urlencoded",
        signature=sign(SECRET.encode(), body),
    )

    assert response.status_code == 202
    assert inbox.stored(database_url, delivery_id).body == payload.decode()
    assert queued(broker) == [{"delivery_id": delivery_id, "event": "issue_comment"}]


def test_a_large_delivery_on_sqlite_is_stored_as_text(tmp_path) -> None:
    from tests.conftest import migrate

    url = f"sqlite:///{tmp_path / 'inbox.sqlite3'}"
    migrate(url)
    body = large_delivery(BY_REFERENCE_OVER + 1000)
    delivery_id = str(uuid.uuid4())

    assert Inbox(gateway_engine(url, 1)).store(delivery_id, "push", body, {})
    assert inbox.stored(url, delivery_id).body == body.decode()


def test_the_gateway_answers_many_at_once_each_once(client, broker) -> None:
    # One gateway, so one intake; Flask's test client is one per thread.
    app = gateway().application
    clients = [app.test_client() for _ in range(12)]
    ids = [str(uuid.uuid4()) for _ in clients]
    answers: dict[str, int] = {}

    def send(index: int) -> None:
        body = json.dumps({"hookline_test": ids[index]}).encode()
        answers[ids[index]] = post(
            clients[index], body, delivery_id=ids[index]
        ).status_code

    threads = [threading.Thread(target=send, args=(n,)) for n in range(len(ids))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)

    assert answers == dict.fromkeys(ids, 202)
    assert sorted(kwargs["delivery_id"] for kwargs in queued(broker)) == sorted(ids)


def test_claims_go_on_after_redis_forgets_the_script(redis_client) -> None:
    deduplicator = Deduplicator(redis_client, 60, 60, PREFIX)
    first, second = arrival(), arrival()
    ((claim, _),) = deduplicator.claim_many([(first.delivery_id, first.digest)])
    assert claim is Claim.NEW

    redis_client.script_flush()
    claimed = deduplicator.claim_many(
        [(second.delivery_id, second.digest), (first.delivery_id, first.digest)]
    )

    assert [claim for claim, _ in claimed] == [Claim.NEW, Claim.ID_SEEN]


def test_a_claim_left_by_a_refused_attempt_does_not_refuse_the_redelivery(
    client, broker, redis_client, database_url
) -> None:
    # Redis ran an attempt's claim after the gateway had stopped waiting for it
    # and answered 503: the claim is there, the row is not.
    body = json.dumps({"hookline_test": str(uuid.uuid4())}).encode()
    delivery_id = str(uuid.uuid4())
    left = Deduplicator(redis_client, 60, 60, PREFIX)
    left.claim_many([(delivery_id, body_digest(body))])

    redelivered = post(client, body, delivery_id=delivery_id)
    replayed = post(client, body, delivery_id=delivery_id.upper())

    assert redelivered.status_code == 202
    assert replayed.json["status"] == "duplicate"
    assert [kwargs["delivery_id"] for kwargs in queued(broker)] == [delivery_id]
    assert inbox.stored(database_url, delivery_id) is not None


def test_a_stuck_batch_does_not_hold_the_deliveries_after_it(
    held, database_url
) -> None:
    pushed: list[str] = []
    intake = Intake(
        held,
        Inbox(gateway_engine(database_url, 2)),
        lambda arrivals: pushed.extend(a.delivery_id for a in arrivals) or [],
        stuck_after=0.2,
    )
    stuck, later = arrival(), arrival()
    _, threads = take_all(intake, [stuck])
    assert held.entered.wait(10)
    threading.Event().wait(0.4)

    outcome = intake.take(later, wait=5)
    held.release_first.set()
    for thread in threads:
        thread.join(10)

    assert outcome is Outcome.QUEUED
    assert stuck.outcome is Outcome.QUEUED
    assert pushed == [later.delivery_id, stuck.delivery_id]
