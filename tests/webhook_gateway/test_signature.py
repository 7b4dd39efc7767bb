"""Pin the X-Hub-Signature-256 check to GitHub's published test vector."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from webhook_gateway.signature import is_valid_signature, sign

# https://docs.github.com/webhooks/using-webhooks/validating-webhook-deliveries
SECRET = b"It's a Secret to Everybody"
BODY = b"Hello, World!"
DIGEST = "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
HEADER = f"sha256={DIGEST}"


def test_github_test_vector_verifies() -> None:
    assert is_valid_signature(SECRET, BODY, HEADER)


def test_sign_reproduces_github_test_vector() -> None:
    assert sign(SECRET, BODY) == HEADER


def test_one_byte_change_in_body_fails() -> None:
    assert not is_valid_signature(SECRET, b"Hello, World?", HEADER)


def test_wrong_secret_fails() -> None:
    assert not is_valid_signature(b"It's a Secret to Nobody", BODY, HEADER)


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(None, id="missing"),
        pytest.param("", id="empty"),
        pytest.param(DIGEST, id="no-prefix"),
        pytest.param(f"sha1={DIGEST}", id="sha1-prefix"),
        pytest.param(f"SHA256={DIGEST}", id="uppercase-prefix"),
        pytest.param(f"sha256={DIGEST.upper()}", id="uppercase-hex"),
        pytest.param(f"sha256={DIGEST[:-1]}", id="one-digit-short"),
        pytest.param(f"sha256={DIGEST}0", id="one-digit-long"),
        pytest.param(f"sha256={DIGEST[:-1]}g", id="non-hex"),
        pytest.param(f" {HEADER}", id="leading-space"),
        pytest.param(f"{HEADER},{HEADER}", id="repeated"),
    ],
)
def test_malformed_header_is_rejected(header: str | None) -> None:
    assert not is_valid_signature(SECRET, BODY, header)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("Grüße, café, naïve", id="latin"),
        pytest.param("ship it 🚀🎉", id="emoji"),
        pytest.param("修复解析器 — 最后一行", id="cjk"),
    ],
)
def test_non_ascii_body_bytes_verify(text: str) -> None:
    body = f'{{"comment": {{"body": "{text}"}}}}'.encode()
    header = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()

    assert is_valid_signature(SECRET, body, header)
    assert not is_valid_signature(SECRET, body + b" ", header)
