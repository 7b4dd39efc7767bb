"""Replay protection: a delivery claims its id and its body hash in Redis.

The claim is the fast first check; the inbox's unique delivery id is the lasting
one. A batch of deliveries claims in one round trip (webhook_gateway/intake.py).
When the broker is this same Redis database, the gateway pushes its task
messages here too (`push`, workers.celery_app.RedisTaskMessages).
"""

from __future__ import annotations

import enum
import hashlib
import time

import redis

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


class Claim(enum.IntEnum):
    """What the claim script answers for one delivery."""

    NEW = 1
    BODY_SEEN = 0
    ID_SEEN = -1


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

    def claim_many(
        self, deliveries: list[tuple[str, str]]
    ) -> list[tuple[Claim, list[str]]]:
        """Claim (delivery id, body digest) pairs in one round trip, in order.

        Returns, for each, what Redis remembered (earlier in the same list
        included) and the keys the delivery now holds (none unless NEW). A
        digest is body_digest(body).
        """
        held = [
            # GitHub sends lowercase GUIDs; case must not make a replay look new.
            [
                f"{self._prefix}delivery:{delivery_id.lower()}",
                f"{self._prefix}body:{digest}",
            ]
            for delivery_id, digest in deliveries
        ]
        try:
            answers = self._claim_all(held)
        except redis.exceptions.NoScriptError:
            # Redis restarted and forgot the script: load it once more.
            self._client.script_load(_CLAIM)
            answers = self._claim_all(held)
        return [
            (Claim(answer), keys if answer == Claim.NEW else [])
            for keys, answer in zip(held, answers, strict=True)
        ]

    def _claim_all(self, held: list[list[str]]) -> list[object]:
        # EVALSHA by hand: a pipeline given the Script object asks Redis first
        # whether it has the script, a round trip more for every batch.
        pipe = self._client.pipeline(transaction=False)
        for keys in held:
            pipe.evalsha(self._claim.sha, len(keys), *keys, *self._ttls)
        return pipe.execute()

    def release(self, keys: list[str]) -> None:
        """Forget claims, so that GitHub's redelivery of them is accepted."""
        if keys:
            self._client.delete(*keys)

    def push(self, queue_key: str, messages: list[bytes | bytearray]) -> None:
        """Push task messages onto a list of this Redis (it is the broker), in order.

        Celery takes from the list's right end: pushed left in this order, the
        first message is the first taken.
        """
        # redis-py sends a memoryview as it is; a bytearray it refuses.
        self._client.lpush(queue_key, *(memoryview(message) for message in messages))


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
