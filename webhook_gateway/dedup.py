"""Replay protection: one Redis round trip claims a delivery id and a body hash."""

from __future__ import annotations

import hashlib

import redis

DELIVERY_KEY = "hookline:delivery:{}"
BODY_KEY = "hookline:body:{}"


class DeliveryClaim:
    """The keys one accepted delivery holds, so they can be let go if queueing fails."""

    def __init__(self, client: redis.Redis, keys: list[str]) -> None:
        self._client = client
        self._keys = keys

    def release(self) -> None:
        """Forget the delivery so that GitHub's redelivery of it is accepted."""
        self._client.delete(*self._keys)


def claim_delivery(
    client: redis.Redis,
    delivery_id: str,
    body: bytes,
    delivery_ttl: int,
    body_ttl: int,
) -> DeliveryClaim | None:
    """Claim a delivery; return None when its id or its body was seen recently."""
    keys = [
        DELIVERY_KEY.format(delivery_id),
        BODY_KEY.format(hashlib.sha256(body).hexdigest()),
    ]
    pipe = client.pipeline(transaction=False)
    pipe.set(keys[0], "1", nx=True, ex=delivery_ttl)
    pipe.set(keys[1], "1", nx=True, ex=body_ttl)
    new_id, new_body = pipe.execute()

    if new_id and new_body:
        return DeliveryClaim(client, keys)
    # Keep whichever key this call did set: the delivery was seen either way.
    return None
