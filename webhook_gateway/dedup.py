"""Replay protection: one Redis round trip claims a delivery id and a body hash."""

from __future__ import annotations

import hashlib
import logging

import redis

log = logging.getLogger(__name__)


# Claim the delivery id first and the body only for a new id, so that a replayed
# id never claims a body it did not deliver. 1: claimed; 0: body seen; -1: id seen.
_CLAIM = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return -1
end
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[2]) then
  return 0
end
return 1
"""


class DeliveryClaim:
    """The keys one accepted delivery holds, so they can be let go if queueing fails."""

    def __init__(self, client: redis.Redis, keys: list[str]) -> None:
        self._client = client
        self._keys = keys

    def release(self) -> None:
        """Forget the delivery so that GitHub's redelivery of it is accepted."""
        try:
            self._client.delete(*self._keys)
        except redis.RedisError as exc:
            # The keys expire by themselves; until then a redelivery is a duplicate.
            log.error("delivery.release_failed", extra={"error": type(exc).__name__})


class Deduplicator:
    """Claims deliveries in Redis, with the claim script loaded once per process."""

    def __init__(
        self,
        client: redis.Redis,
        delivery_ttl: int,
        body_ttl: int,
        prefix: str = "hookline:",
    ) -> None:
        self._client = client
        self._claim = client.register_script(_CLAIM)
        self._ttls = [delivery_ttl, body_ttl]
        self._prefix = prefix

    def claim(self, delivery_id: str, body: bytes) -> DeliveryClaim | None:
        """Claim a delivery; return None when its id or its body was seen recently."""
        # GitHub sends lowercase GUIDs; case must not make a replay look new.
        keys = [
            f"{self._prefix}delivery:{delivery_id.lower()}",
            f"{self._prefix}body:{hashlib.sha256(body).hexdigest()}",
        ]
        if self._claim(keys=keys, args=self._ttls) == 1:
            return DeliveryClaim(self._client, keys)
        return None
