"""Replay protection: one Redis round trip claims a delivery id and a body hash.

The claim is the fast first check; the inbox's unique delivery id is the lasting
one. When the broker is this same Redis database, the gateway pushes its task
message here too (`push`, workers.celery_app.RedisTaskMessages).
"""

from __future__ import annotations

import hashlib
import logging
import time

import redis

log = logging.getLogger(__name__)


# Claim the delivery id first and the body only for a new id, so that a replayed
# id never claims a body it did not deliver. 1: claimed; 0: body seen; -1: id seen.
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return -1
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('SET', KEYS[1], '1', 'EX', ARGV[1])
  return 0
end
redis.call('SET', KEYS[1], '1', 'EX', ARGV[1])
redis.call('SET', KEYS[2], '1', 'EX', ARGV[2])
return 1
"""


def body_digest(body: bytes | bytearray) -> str:
    """Return the hash a body is remembered by."""
    return hashlib.sha256(body).hexdigest()


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

    def claim(self, delivery_id: str, digest: str) -> DeliveryClaim | None:
        """Claim a delivery; return None when its id or its body was seen recently.

        `digest` is body_digest(body).
        """
        # GitHub sends lowercase GUIDs; case must not make a replay look new.
        keys = [
            f"{self._prefix}delivery:{delivery_id.lower()}",
            f"{self._prefix}body:{digest}",
        ]
        if self._claim(keys=keys, args=self._ttls) == 1:
            return DeliveryClaim(self._client, keys)
        return None

    def push(self, queue_key: str, message: bytes | bytearray) -> None:
        """Push a task message onto a list of this Redis (it is the broker)."""
        # redis-py sends a memoryview as it is; a bytearray it refuses.
        self._client.lpush(queue_key, memoryview(message))


class RateLimiter:
    """Requests per minute per key (a source address, an installation), in Redis.

    A fixed one-minute window: one INCR and EXPIRE in one round trip.
    """

    def __init__(self, client: redis.Redis, prefix: str = "hookline:") -> None:
        self._client = client
        self._prefix = prefix

    def over(self, kind: str, key: str, per_minute: int) -> float | None:
        """Count one request; return seconds until the window ends if over."""
        now = time.time()
        window = f"{self._prefix}rate:{kind}:{key}:{int(now // 60)}"
        pipe = self._client.pipeline(transaction=False)
        pipe.incr(window)
        pipe.expire(window, 120)
        count, _ = pipe.execute()
        if count > per_minute:
            return 60 - now % 60
        return None
