"""The gateway on real Redis: what each kind of request is answered, what is queued.

The gateway publishes to a Redis broker database no worker reads, so a test can
count exactly the messages a request queued.
"""

from __future__ import annotations

import io
import json
import socket
import time
import uuid
from urllib.parse import urlencode

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select

from hookline import inbox
from hookline.db import session_scope
from hookline.models import Delivery
from tests.conftest import PREFIX, SECRET, fixture_bytes
from tests.webhook_gateway.conftest import gateway, queued
from webhook_gateway.app import EVENTS_PATH
from webhook_gateway.signature import sign

BODY = fixture_bytes("issue_comment.created.json")
# What gunicorn tells the app for a chunked body: read the stream to its end.
CHUNKED = {"wsgi.input_terminated": True}


def post(
    client: FlaskClient,
    body: bytes = BODY,
    *,
    event: str | None = "issue_comment",
    delivery_id: str | None = None,
    signature: str | None = None,
    content_type: str = "application/json",
    secret: str = SECRET,
    extra: dict[str, str] | None = None,
):
    headers = {
        **(extra or {}),
        "Content-Type": content_type,
        "X-GitHub-Delivery": delivery_id or str(uuid.uuid4()),
        "X-Hub-Signature-256": signature or sign(secret.encode(), body),
    }
    if event is not None:
        headers["X-GitHub-Event"] = event
    return client.post(EVENTS_PATH, data=body, headers=headers)


def test_signed_delivery_is_queued_once_and_answered_202(client, broker) -> None:
    delivery_id = str(uuid.uuid4())
    response = post(client, delivery_id=delivery_id)

    assert response.status_code == 202
    assert response.json == {"status": "queued", "delivery": delivery_id}
    assert queued(broker) == [
        {
            "delivery_id": delivery_id,
            "event": "issue_comment",
            "body": BODY.decode(),
        }
    ]


def test_form_encoded_delivery_is_verified_on_raw_bytes(client, broker) -> None:
    body = urlencode({"payload": BODY.decode()}).encode()
    response = post(client, body, content_type="application/x-www-form-urlencoded")

    assert response.status_code == 202
    assert queued(broker)[0]["body"] == BODY.decode()


@pytest.mark.parametrize(
    "signature",
    [
        None,
        "sha256=" + "0" * 64,
        "sha1=" + "0" * 40,
        sign(b"another secret", BODY),
        sign(SECRET.encode(), BODY).upper(),
        sign(SECRET.encode(), BODY)[:-1],
    ],
    ids=["missing", "zeros", "sha1", "other-secret", "uppercase", "truncated"],
)
def test_bad_signature_is_refused_with_403(client, broker, signature) -> None:
    headers = {
        "Content-Type": "application/json",
        "X-GitHub-Event": "issue_comment",
        "X-GitHub-Delivery": str(uuid.uuid4()),
    }
    if signature is not None:
        headers["X-Hub-Signature-256"] = signature
    response = client.post(EVENTS_PATH, data=BODY, headers=headers)

    assert response.status_code == 403
    assert response.json["reason"] == "bad_signature"
    assert queued(broker) == []


def test_signature_of_a_different_body_is_refused(client, broker) -> None:
    response = post(client, BODY + b" ", signature=sign(SECRET.encode(), BODY))

    assert response.status_code == 403
    assert queued(broker) == []


@pytest.mark.parametrize(
    ("event", "delivery_id"),
    [
        (None, None),
        ("", None),
        ("Issue Comment", None),
        ("issues", "not/a guid"),
        ("issues", "-"),
        ("issues", "a" * 73),
    ],
    ids=["no-event", "empty-event", "bad-event", "slash-id", "dash-id", "long-id"],
)
def test_missing_or_malformed_headers_get_400(client, broker, event, delivery_id):
    response = post(client, event=event, delivery_id=delivery_id or str(uuid.uuid4()))

    assert response.status_code == 400
    assert response.json["reason"] == "bad_headers"
    assert queued(broker) == []


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[1, 2]", b'"a string"', b"\xff\xfe{}", b""],
    ids=["truncated", "array", "string", "not-utf8", "empty"],
)
def test_signed_body_that_is_not_a_json_object_gets_400(client, broker, body):
    response = post(client, body)

    assert response.status_code == 400
    assert response.json["reason"] == "malformed_payload"
    assert queued(broker) == []


def test_form_body_without_payload_field_gets_400(client, broker) -> None:
    body = b"other=1"
    response = post(client, body, content_type="application/x-www-form-urlencoded")

    assert response.status_code == 400
    assert queued(broker) == []


def test_unsupported_content_type_gets_415(client, broker) -> None:
    response = post(client, content_type="text/plain")

    assert response.status_code == 415
    assert queued(broker) == []


def test_body_over_the_cap_gets_413_and_queues_nothing(redis_client, broker) -> None:
    small = gateway(HOOKLINE_MAX_BODY_BYTES=1000)
    response = post(small, BODY)

    assert len(BODY) > 1000
    assert response.status_code == 413
    assert response.json["reason"] == "body_too_large"
    assert queued(broker) == []


def test_ping_is_answered_200_and_queues_nothing(client, broker) -> None:
    response = post(client, fixture_bytes("ping.json"), event="ping")

    assert response.status_code == 200
    assert response.json["status"] == "pong"
    assert queued(broker) == []


def test_replayed_delivery_id_is_answered_200_and_queued_once(client, broker):
    delivery_id = str(uuid.uuid4())
    first = post(client, delivery_id=delivery_id)
    again = post(client, delivery_id=delivery_id)

    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json["status"] == "duplicate"
    assert len(queued(broker)) == 1


def test_unknown_event_is_accepted_for_the_classifier_to_ignore(client, broker):
    response = post(client, b'{"action": "created"}', event="star")

    assert response.status_code == 202
    assert queued(broker)[0]["event"] == "star"


def test_disabled_webhooks_answer_503_with_a_message(redis_client, broker) -> None:
    response = post(gateway(GITHUB_WEBHOOKS_ENABLED=False))

    assert response.status_code == 503
    assert response.json["reason"] == "webhooks_disabled"
    assert "GITHUB_WEBHOOKS_ENABLED" in response.json["message"]
    assert queued(broker) == []


def test_broker_down_answers_503_and_lets_a_redelivery_through(client, broker):
    # Port 1 on loopback: nothing listens, so the publish fails at once.
    down = gateway(CELERY_BROKER_URL="redis://127.0.0.1:1/0")
    delivery_id = str(uuid.uuid4())

    refused = post(down, delivery_id=delivery_id)
    redelivered = post(client, delivery_id=delivery_id)

    assert refused.status_code == 503
    assert refused.json["reason"] == "queue_unavailable"
    assert redelivered.status_code == 202
    assert len(queued(broker)) == 1


def test_accepted_delivery_is_in_the_inbox_before_the_answer(
    client, broker, database_url
) -> None:
    delivery_id = str(uuid.uuid4())
    response = post(client, delivery_id=delivery_id)

    assert response.status_code == 202
    with session_scope(database_url) as session:
        row = session.scalars(
            select(Delivery).where(Delivery.delivery_id == delivery_id)
        ).one()
    assert (row.event, row.verdict, row.body) == (
        "issue_comment",
        "received",
        BODY.decode(),
    )
    assert row.headers["X-GitHub-Delivery"] == delivery_id
    assert row.headers["X-GitHub-Event"] == "issue_comment"
    assert "X-Hub-Signature-256" not in row.headers


def test_database_down_answers_503_and_keeps_nothing(client, broker) -> None:
    down = gateway(DATABASE_URL="postgresql://postgres@127.0.0.1:1/test")
    delivery_id = str(uuid.uuid4())

    started = time.monotonic()
    refused = post(down, delivery_id=delivery_id)
    waited = time.monotonic() - started
    nothing = queued(broker)
    redelivered = post(client, delivery_id=delivery_id)

    assert refused.status_code == 503
    assert refused.json["reason"] == "inbox_unavailable"
    assert waited < 8
    assert nothing == []
    # The claim was let go: GitHub's redelivery, with the database back, is taken.
    assert redelivered.status_code == 202
    assert len(queued(broker)) == 1


def test_queue_failure_leaves_no_row_in_the_inbox(client, broker, database_url):
    down = gateway(CELERY_BROKER_URL="redis://127.0.0.1:1/0")
    delivery_id = str(uuid.uuid4())

    assert post(down, delivery_id=delivery_id).status_code == 503
    assert inbox.stored(database_url, delivery_id) is None


def test_an_id_the_inbox_knows_stays_a_duplicate_after_redis_forgets_it(
    client, broker, redis_client
) -> None:
    delivery_id = str(uuid.uuid4())
    first = post(client, delivery_id=delivery_id)
    for key in redis_client.scan_iter(f"{PREFIX}*"):
        if not key.startswith(f"{PREFIX}installation-token:".encode()):
            redis_client.delete(key)
    again = post(client, delivery_id=delivery_id)

    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json["status"] == "duplicate"
    assert len(queued(broker)) == 1


def test_redis_down_answers_503(broker) -> None:
    response = post(gateway(REDIS_URL="redis://127.0.0.1:1/0"))

    assert response.status_code == 503
    assert response.json["reason"] == "dedup_unavailable"
    assert queued(broker) == []


def test_other_methods_and_paths_are_not_served(client) -> None:
    assert client.get(EVENTS_PATH).status_code == 405
    assert client.post("/integration/github/other", data=BODY).status_code == 404


def post_chunked(client: FlaskClient, body: bytes, signed: bytes):
    """Send `body` with chunked framing and a signature over `signed`."""
    return client.post(
        EVENTS_PATH,
        input_stream=io.BytesIO(body),
        environ_overrides=CHUNKED,
        headers={
            "Content-Type": "application/json",
            "Transfer-Encoding": "chunked",
            "X-GitHub-Event": "issue_comment",
            "X-GitHub-Delivery": str(uuid.uuid4()),
            "X-Hub-Signature-256": sign(SECRET.encode(), signed),
        },
    )


def test_chunked_body_over_the_cap_gets_413(redis_client, broker) -> None:
    body = b'{"padding": "' + b"x" * 2000 + b'"}'
    # Signed over the first 1000 bytes: a cut body must not pass as whole.
    response = post_chunked(gateway(HOOKLINE_MAX_BODY_BYTES=1000), body, body[:1000])

    assert response.status_code == 413
    assert queued(broker) == []


def test_chunked_body_within_the_cap_is_accepted(client, broker) -> None:
    response = post_chunked(client, BODY, BODY)

    assert response.status_code == 202
    assert queued(broker)[0]["body"] == BODY.decode()


def test_json_nested_too_deep_to_parse_gets_400(client, broker) -> None:
    depth = 100_000
    body = b'{"a": ' + b"[" * depth + b"]" * depth + b"}"
    response = post(client, body)

    assert response.status_code == 400
    assert response.json["reason"] == "malformed_payload"
    assert queued(broker) == []


def test_replayed_id_with_a_new_body_does_not_claim_that_body(client, broker):
    delivery_id = str(uuid.uuid4())
    other_body = fixture_bytes("issues.labeled.json")

    first = post(client, delivery_id=delivery_id)
    replay = post(client, other_body, event="issues", delivery_id=delivery_id)
    fresh = post(client, other_body, event="issues")

    assert (first.status_code, replay.status_code, fresh.status_code) == (
        202,
        200,
        202,
    )
    assert len(queued(broker)) == 2


def test_delivery_id_in_another_letter_case_is_a_replay(client, broker) -> None:
    delivery_id = str(uuid.uuid4())
    post(client, delivery_id=delivery_id)
    again = post(client, delivery_id=delivery_id.upper())

    assert again.status_code == 200
    assert len(queued(broker)) == 1


def test_hung_broker_answers_503_in_time_and_releases_the_claim(client, broker):
    # A listener that accepts connections and never says a word, like a hung broker.
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        port = hung.getsockname()[1]
        stuck = gateway(CELERY_BROKER_URL=f"redis://127.0.0.1:{port}/0")
        delivery_id = str(uuid.uuid4())

        started = time.monotonic()
        refused = post(stuck, delivery_id=delivery_id)
        waited = time.monotonic() - started

    redelivered = post(client, delivery_id=delivery_id)
    assert refused.status_code == 503
    assert refused.json["reason"] == "queue_unavailable"
    # GitHub gives up after 10 s; the answer must come well before.
    assert waited < 8
    assert redelivered.status_code == 202
    assert len(queued(broker)) == 1


def fresh() -> bytes:
    """Return the recorded body made unique, so that no body hash repeats."""
    payload = json.loads(BODY)
    payload["hookline_test"] = str(uuid.uuid4())
    return json.dumps(payload).encode()


def test_the_previous_secret_still_verifies_while_it_is_rotated(client, broker):
    rotating = gateway(
        GITHUB_APP_WEBHOOK_SECRET="the-new-secret",
        GITHUB_APP_WEBHOOK_SECRET_PREVIOUS=SECRET,
    )

    old = post(rotating, fresh())
    new = post(rotating, fresh(), secret="the-new-secret")
    stranger = post(rotating, fresh(), secret="not-either")

    assert (old.status_code, new.status_code, stranger.status_code) == (202, 202, 403)
    assert len(queued(broker)) == 2


def test_a_source_outside_the_allow_list_is_refused(client, broker) -> None:
    closed = gateway(HOOKLINE_ALLOWED_SOURCES="140.82.112.0/20")
    opened = gateway(HOOKLINE_ALLOWED_SOURCES="140.82.112.0/20, 127.0.0.0/8")

    refused = post(closed)
    taken = post(opened)

    assert refused.status_code == 403
    assert refused.json["reason"] == "source_not_allowed"
    assert taken.status_code == 202
    assert len(queued(broker)) == 1


def test_behind_a_trusted_proxy_the_forwarded_address_is_checked(client, broker):
    proxied = gateway(
        HOOKLINE_ALLOWED_SOURCES="140.82.112.0/20", HOOKLINE_TRUSTED_PROXIES=1
    )

    github = post(proxied, extra={"X-Forwarded-For": "140.82.115.9"})
    other = post(proxied, extra={"X-Forwarded-For": "10.1.2.3"})

    assert (github.status_code, other.status_code) == (202, 403)


def test_a_source_over_its_rate_gets_429_with_retry_after(client, broker) -> None:
    limited = gateway(HOOKLINE_SOURCE_RATE_LIMIT=3)

    answers = [post(limited, fresh()) for _ in range(5)]

    assert [a.status_code for a in answers] == [202, 202, 202, 429, 429]
    assert answers[3].json["reason"] == "rate_limited"
    assert 1 <= int(answers[3].headers["Retry-After"]) <= 60
    assert len(queued(broker)) == 3


def test_an_installation_over_its_rate_gets_429(client, broker) -> None:
    limited = gateway(HOOKLINE_INSTALLATION_RATE_LIMIT=2)
    installation = 700_000 + uuid.uuid4().int % 100_000

    def body(number: int) -> bytes:
        payload = json.loads(BODY)
        payload["installation"]["id"] = installation
        payload["comment"]["id"] = number
        return json.dumps(payload).encode()

    answers = [post(limited, body(n)).status_code for n in range(3)]
    other = json.loads(BODY)
    other["installation"]["id"] = installation + 1
    elsewhere = post(limited, json.dumps(other).encode()).status_code

    assert answers == [202, 202, 429]
    assert elsewhere == 202
