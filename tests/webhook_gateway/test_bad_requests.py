"""A corpus of bad requests, and a fuzz: each gets its documented status, never 500.

Runs the gateway in-process on real Redis, publishing to a broker database no
worker reads, so whatever a request queued can be counted.
"""

from __future__ import annotations

import json
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import SECRET, fixture_bytes
from tests.webhook_gateway.conftest import queued
from webhook_gateway.app import EVENTS_PATH
from webhook_gateway.signature import sign

BODY = fixture_bytes("issues.labeled.json")
GOOD = sign(SECRET.encode(), BODY)


def headers(**changes: str | None) -> dict[str, str]:
    base = {
        "Content-Type": "application/json",
        "X-GitHub-Event": "issues",
        "X-GitHub-Delivery": str(uuid.uuid4()),
        "X-Hub-Signature-256": GOOD,
    }
    base.update(changes)
    return {name: value for name, value in base.items() if value is not None}


def signed(body: bytes) -> dict[str, str]:
    return headers(**{"X-Hub-Signature-256": sign(SECRET.encode(), body)})


# (name, body, headers, status)
CORPUS: list[tuple[str, bytes, dict[str, str], int]] = [
    ("no signature", BODY, headers(**{"X-Hub-Signature-256": None}), 403),
    ("empty signature", BODY, headers(**{"X-Hub-Signature-256": ""}), 403),
    ("bare hex", BODY, headers(**{"X-Hub-Signature-256": GOOD[7:]}), 403),
    ("sha1 prefix", BODY, headers(**{"X-Hub-Signature-256": "sha1=" + GOOD[7:]}), 403),
    (
        "SHA256 prefix",
        BODY,
        headers(**{"X-Hub-Signature-256": "SHA256" + GOOD[6:]}),
        403,
    ),
    ("uppercase hex", BODY, headers(**{"X-Hub-Signature-256": GOOD.upper()}), 403),
    ("one hex short", BODY, headers(**{"X-Hub-Signature-256": GOOD[:-1]}), 403),
    ("one hex long", BODY, headers(**{"X-Hub-Signature-256": GOOD + "0"}), 403),
    ("non-hex", BODY, headers(**{"X-Hub-Signature-256": "sha256=" + "g" * 64}), 403),
    ("zeros", BODY, headers(**{"X-Hub-Signature-256": "sha256=" + "0" * 64}), 403),
    ("other secret", BODY, headers(**{"X-Hub-Signature-256": sign(b"x", BODY)}), 403),
    ("empty secret", BODY, headers(**{"X-Hub-Signature-256": sign(b"", BODY)}), 403),
    ("truncated body", BODY[:-10], headers(), 403),
    ("body plus newline", BODY + b"\n", headers(), 403),
    ("body plus space", b" " + BODY, headers(), 403),
    (
        "only old sha1 header",
        BODY,
        {
            **headers(**{"X-Hub-Signature-256": None}),
            "X-Hub-Signature": "sha1=" + "0" * 40,
        },
        403,
    ),
    ("no event", BODY, headers(**{"X-GitHub-Event": None}), 400),
    ("empty event", BODY, headers(**{"X-GitHub-Event": ""}), 400),
    ("event with space", BODY, headers(**{"X-GitHub-Event": "issue comment"}), 400),
    ("event uppercase", BODY, headers(**{"X-GitHub-Event": "Issues"}), 400),
    ("event with dot", BODY, headers(**{"X-GitHub-Event": "issues.labeled"}), 400),
    ("event too long", BODY, headers(**{"X-GitHub-Event": "a" * 65}), 400),
    ("event unicode", BODY, headers(**{"X-GitHub-Event": "issu\u00e9s"}), 400),
    ("no delivery id", BODY, headers(**{"X-GitHub-Delivery": None}), 400),
    ("empty delivery id", BODY, headers(**{"X-GitHub-Delivery": ""}), 400),
    ("delivery id slash", BODY, headers(**{"X-GitHub-Delivery": "a/b"}), 400),
    ("delivery id colon", BODY, headers(**{"X-GitHub-Delivery": "a:b"}), 400),
    ("delivery id star", BODY, headers(**{"X-GitHub-Delivery": "*"}), 400),
    ("delivery id space", BODY, headers(**{"X-GitHub-Delivery": "a b"}), 400),
    ("delivery id dash", BODY, headers(**{"X-GitHub-Delivery": "-"}), 400),
    ("delivery id 73", BODY, headers(**{"X-GitHub-Delivery": "a" * 73}), 400),
    ("delivery id unicode", BODY, headers(**{"X-GitHub-Delivery": "\u00e9"}), 400),
    ("text/plain", BODY, headers(**{"Content-Type": "text/plain"}), 415),
    ("no content type", BODY, headers(**{"Content-Type": None}), 415),
    ("multipart", BODY, headers(**{"Content-Type": "multipart/form-data"}), 415),
    ("xml", BODY, headers(**{"Content-Type": "application/xml"}), 415),
    (
        "json with charset",
        BODY,
        headers(**{"Content-Type": "application/json; charset=utf-8"}),
        202,
    ),
]
for name, body in [
    ("empty body", b""),
    ("truncated json", b'{"action": "labeled"'),
    ("json array", b"[]"),
    ("json string", b'"issues"'),
    ("json number", b"42"),
    ("json null", b"null"),
    ("json true", b"true"),
    ("trailing garbage", b'{"a": 1} x'),
    ("invalid utf-8", b'{"a": "\xff"}'),
    ("utf-16", '{"a": 1}'.encode("utf-16")),
    ("utf-8 bom", b'\xef\xbb\xbf{"a": 1}'),
    ("single quotes", b"{'a': 1}"),
    ("nested 100000", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ("huge integer", b'{"a": ' + b"9" * 5000 + b"}"),
    ("lone brace", b"{"),
    ("nul byte", b'{"a": 1}\x00'),
]:
    CORPUS.append((f"signed {name}", body, signed(body), 400))
for name, body in [
    ("emoji", '{"action": "created", "comment": {"body": "\U0001f680 @openhands"}}'),
    ("cjk", '{"action": "created", "comment": {"body": "\u4fee\u590d @openhands"}}'),
    ("escaped surrogate", '{"a": "\\ud800"}'),
    ("NaN literal", '{"a": NaN}'),
    ("duplicate keys", '{"a": 1, "a": 2}'),
    ("deep but parseable", '{"a": ' + "[" * 300 + "]" * 300 + "}"),
]:
    CORPUS.append((f"signed {name}", body.encode(), signed(body.encode()), 202))


FORM = "application/x-www-form-urlencoded"
for name, body, status in [
    ("form without payload", b"other=1", 400),
    ("form payload not json", b"payload=hello", 400),
    ("form bad percent-encoding", b"payload=%ZZ", 400),
    ("form non-ascii bytes", b"payload=\xe9", 400),
    ("form payload array", b"payload=%5B%5D", 400),
    ("form payload object", b"payload=%7B%22a%22%3A1%7D", 202),
]:
    CORPUS.append((name, body, {**signed(body), "Content-Type": FORM}, status))


@pytest.mark.parametrize(
    ("body", "request_headers", "status"),
    [case[1:] for case in CORPUS],
    ids=[case[0] for case in CORPUS],
)
def test_bad_request_gets_its_documented_status(
    client, broker, body, request_headers, status
) -> None:
    response = client.post(EVENTS_PATH, data=body, headers=request_headers)

    assert response.status_code == status
    assert len(queued(broker)) == (1 if status == 202 else 0)
    if status != 202:
        assert response.json["reason"]
        assert "Traceback" not in response.get_data(as_text=True)


def test_corpus_is_at_least_sixty_cases() -> None:
    assert len(CORPUS) >= 60


header_values = st.one_of(
    st.none(), st.text(max_size=80), st.sampled_from(["issues", "ping", "push"])
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    body=st.one_of(
        st.binary(max_size=2000),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(st.text(max_size=8), inner, max_size=4)
            ),
            max_leaves=20,
        ).map(lambda value: json.dumps(value).encode()),
    ),
    event=header_values,
    delivery=header_values,
    content_type=st.sampled_from(
        ["application/json", "application/x-www-form-urlencoded", "text/plain", ""]
    ),
    sign_it=st.booleans(),
)
def test_fuzzed_request_never_gets_a_500(
    client, body, event, delivery, content_type, sign_it
) -> None:
    request_headers = {"Content-Type": content_type}
    # Werkzeug's test client takes only Latin-1 header values, as HTTP does.
    for name, value in (("X-GitHub-Event", event), ("X-GitHub-Delivery", delivery)):
        if value is not None and value.isascii() and value.isprintable():
            request_headers[name] = value
    if sign_it:
        request_headers["X-Hub-Signature-256"] = sign(SECRET.encode(), body)

    response = client.post(EVENTS_PATH, data=body, headers=request_headers)

    assert response.status_code in {200, 202, 400, 403, 415}
