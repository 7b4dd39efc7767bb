"""GitHub's webhook signature: `sha256=` and the HMAC-SHA256 of the raw body."""

from __future__ import annotations

import hashlib
import hmac
import re

_HEADER = re.compile(r"sha256=[0-9a-f]{64}")


def sign(secret: bytes, body: bytes) -> str:
    """Return the `X-Hub-Signature-256` value GitHub sends for `body`."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def is_valid_signature(secret: bytes, body: bytes, header: str | None) -> bool:
    """Tell whether `header` signs `body` with `secret`, in constant time."""
    if not header or not _HEADER.fullmatch(header):
        return False
    return hmac.compare_digest(sign(secret, body).encode(), header.encode())
