"""Replay protection: one Redis round trip claims a delivery id and a body hash.

When the broker is that same Redis database, the round trip also queues the task
(workers.celery_app.RedisTaskMessages): claimed and queued happen together or not
at all, so there is no claim to let go of when queueing fails.
"""

from __future__ import annotations

import hashlib
import logging

import redis

log = logging.getLogger(__name__)


# Claim the delivery id first and the body only for a new id, so that a replayed
# id never claims a body it did not deliver. 1: claimed; 0: body seen; -1: id seen.
# With a third key, a claimed delivery's task message is pushed onto that queue
# before anything is claimed: a push Redis refuses (out of memory) claims nothing.
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return -1
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('SET', KEYS[1], '1', 'EX', ARGV[1])
  return 0
end
if KEYS[3] then
  redis.call('LPUSH', KEYS[3], ARGV[3])
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

    def claim(
        self,
        delivery_id: str,
        digest: str,
        queue: tuple[str, bytes | bytearray] | None = None,
    ) -> DeliveryClaim | None:
        """Claim a delivery; return None when its id or its body was seen recently.

        `digest` is body_digest(body). With `queue` (a list's key and a message),
        a claimed delivery's message is pushed onto that list as well.
        """
        # GitHub sends lowercase GUIDs; case must not make a replay look new.
        keys = [
            f"{self._prefix}delivery:{delivery_id.lower()}",
            f"{self._prefix}body:{digest}",
        ]
        args: list[object] = list(self._ttls)
        if queue is not None:
            keys.append(queue[0])
            # redis-py sends a memoryview as it is; a bytearray it refuses.
            args.append(memoryview(queue[1]))
        if self._claim(keys=keys, args=args) == 1:
            return DeliveryClaim(self._client, keys[:2])
        return None
