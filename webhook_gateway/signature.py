"""GitHub's webhook signature: `sha256=` and the HMAC-SHA256 of the raw body."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence

_HEADER = re.compile(r"sha256=[0-9a-f]{64}")


def sign(secret: bytes, body: bytes) -> str:
    """Return the `X-Hub-Signature-256` value GitHub sends for `body`."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def is_valid_signature(
    secrets: bytes | Sequence[bytes], body: bytes, header: str | None
) -> bool:
    """Tell whether `header` signs `body` with one of `secrets`, in constant time.

    Two secrets while one is rotated: GitHub signs with the new one as soon as
    it is saved, and deliveries signed with the old one may still be in flight
    or redelivered.
    """
    if not header or not _HEADER.fullmatch(header):
        return False
    candidates = [secrets] if isinstance(secrets, bytes) else list(secrets)
    # Every secret is tried, so the time taken does not tell which one matched.
    matches = [
        hmac.compare_digest(sign(secret, body).encode(), header.encode())
        for secret in candidates
    ]
    return any(matches)
