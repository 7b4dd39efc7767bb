"""Group commit: the request threads of a gateway process share their round trips.

A request thread that has verified a delivery hands it to the intake and waits
for its outcome. The intake's own thread takes every delivery waiting, then
claims them all in one Redis round trip, stores them all with one INSERT and one
commit, and queues them all with one LPUSH. No timer holds a batch open: what
arrives while a batch is in flight makes the next one, so a lone delivery goes
at once and a burst shares three round trips and one WAL flush.

Each step fails for its whole batch, and undoes what the batch did before it:
a delivery answered 503 leaves neither its claim nor its row, so GitHub's
redelivery of it is taken. (A claim Redis ran after the gateway stopped waiting
can stay; the inbox, not Redis, then decides whether an id was stored.)
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from hookline import metrics
from hookline.inbox import Body, Inbox, InboxUnavailable
from webhook_gateway.dedup import Claim, Deduplicator

log = logging.getLogger(__name__)

# GitHub gives up at 10 s. Each step below gives up within about two seconds on
# its own (socket, pool and statement timeouts) unless a connection hangs without
# closing; this is the backstop.
WAIT_SECONDS = 9.0
MAX_BATCH = 64
# A batch running this long is stuck: another thread takes the deliveries after
# it, up to MAX_THREADS in all (a stuck thread takes its batch up again later).
STUCK_SECONDS = 3.0
MAX_THREADS = 4


class Outcome(enum.Enum):
    """How the intake ended for one delivery."""

    QUEUED = "queued"
    DUPLICATE = "duplicate"
    DEDUP_UNAVAILABLE = "dedup_unavailable"
    INBOX_UNAVAILABLE = "inbox_unavailable"
    QUEUE_UNAVAILABLE = "queue_unavailable"
    # Not handled within WAIT_SECONDS. It may still be queued later; GitHub's
    # redelivery of it is then a duplicate.
    TIMED_OUT = "timed_out"


@dataclass(eq=False)
class Arrival:
    """A verified delivery waiting for the intake."""

    delivery_id: str
    event: str
    # The JSON text, or the UTF-8 bytes of a large delivery.
    body: Body
    digest: str
    headers: dict[str, str]
    # The task message for the Redis broker, built by the request thread.
    message: bytes | bytearray | None = None
    outcome: Outcome | None = None
    claim_keys: list[str] = field(default_factory=list)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)


# Queue the given deliveries; return those that could not be queued.
Enqueue = Callable[[list[Arrival]], list[Arrival]]


class Intake:
    """The batching thread of one gateway process and the deliveries it waits on."""

    def __init__(
        self,
        deduplicator: Deduplicator,
        inbox: Inbox,
        enqueue: Enqueue,
        stuck_after: float = STUCK_SECONDS,
    ) -> None:
        self._deduplicator = deduplicator
        self._inbox = inbox
        self._enqueue = enqueue
        self._stuck_after = stuck_after
        self._waiting: deque[Arrival] = deque()
        self._ready = threading.Condition()
        self._threads: list[threading.Thread] = []
        # When each thread took the batch it is on (by thread id); 0: waiting.
        self._busy_since: dict[int, float] = {}
        self._pid = 0

    def take(self, arrival: Arrival, wait: float = WAIT_SECONDS) -> Outcome:
        """Hand a delivery to the intake; return its outcome once it has one."""
        with self._ready:
            self._start()
            self._waiting.append(arrival)
            self._ready.notify()
            self._unless_stuck()
        if arrival._done.wait(wait):
            assert arrival.outcome is not None
            return arrival.outcome
        with self._ready:
            if arrival in self._waiting:
                # Never taken: nothing was done for it.
                self._waiting.remove(arrival)
        log.error("delivery.intake_timed_out", extra={"seconds": wait})
        return Outcome.TIMED_OUT

    def _start(self) -> None:
        # gunicorn forks its workers after the app is built: a thread started in
        # the master does not exist in them, so each process starts its own.
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._threads, self._busy_since = [], {}
        if not any(thread.is_alive() for thread in self._threads):
            self._add_thread()

    def _unless_stuck(self) -> None:
        """Add a thread when every one has been on its batch too long.

        A connection that stops answering without closing (a proxy or a NAT
        that hangs) holds its batch until TCP gives up: minutes. Its deliveries
        are answered timed_out at WAIT_SECONDS; later ones go to a new thread,
        with a connection of its own.
        """
        now = time.monotonic()
        stuck = all(
            0 < self._busy_since.get(thread.ident or 0, 0) < now - self._stuck_after
            for thread in self._threads
        )
        if stuck and len(self._threads) < MAX_THREADS:
            log.error("intake.stuck", extra={"threads": len(self._threads)})
            self._add_thread()

    def _add_thread(self) -> None:
        thread = threading.Thread(
            target=self._run, name=f"hookline-intake-{len(self._threads)}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def _run(self) -> None:
        me = threading.get_ident()
        while True:
            with self._ready:
                self._busy_since[me] = 0
                while not self._waiting:
                    self._ready.wait()
                count = min(len(self._waiting), MAX_BATCH)
                batch = [self._waiting.popleft() for _ in range(count)]
                self._busy_since[me] = time.monotonic()
            try:
                self._handle(batch)
            except Exception:
                # A bug here must not leave request threads waiting for nothing.
                log.exception(
                    "intake.batch_crashed",
                    extra={"deliveries": [a.delivery_id for a in batch]},
                )
                self._settle(
                    [a for a in batch if a.outcome is None], Outcome.QUEUE_UNAVAILABLE
                )
            finally:
                for arrival in batch:
                    arrival._done.set()

    def _handle(self, batch: list[Arrival]) -> None:
        metrics.GATEWAY_BATCH_SIZE.observe(len(batch))
        try:
            claimed = self._deduplicator.claim_many(
                [(arrival.delivery_id, arrival.digest) for arrival in batch]
            )
        except redis.RedisError as exc:
            self._failed(batch, "dedup", exc)
            self._settle(batch, Outcome.DEDUP_UNAVAILABLE)
            return
        fresh, id_seen = [], []
        for arrival, (claim, keys) in zip(batch, claimed, strict=True):
            if claim is Claim.NEW:
                arrival.claim_keys = keys
                fresh.append(arrival)
            elif claim is Claim.ID_SEEN:
                id_seen.append(arrival)
            else:
                arrival.outcome = Outcome.DUPLICATE
        if id_seen:
            fresh += self._not_stored(id_seen)
        if not fresh:
            return

        try:
            stored_ids = self._inbox.store_many(
                [(a.delivery_id, a.event, a.body, a.headers) for a in fresh]
            )
        except InboxUnavailable as exc:
            self._failed(fresh, "inbox", exc)
            self._release(fresh)
            self._settle(fresh, Outcome.INBOX_UNAVAILABLE)
            return
        stored = []
        for arrival in fresh:
            if arrival.delivery_id in stored_ids:
                # Rows go in in order: an id twice in a batch is the first one's.
                stored_ids.discard(arrival.delivery_id)
                stored.append(arrival)
            else:
                # Known to the inbox though Redis forgot it: the claim outlived its
                # TTL. The claim just made stays, as for any duplicate.
                arrival.outcome = Outcome.DUPLICATE
        if not stored:
            return

        unqueued = self._enqueue(stored)
        if unqueued:
            self._undo(unqueued)
            self._settle(unqueued, Outcome.QUEUE_UNAVAILABLE)
        self._settle([a for a in stored if a.outcome is None], Outcome.QUEUED)

    def _not_stored(self, arrivals: list[Arrival]) -> list[Arrival]:
        """Return the arrivals Redis remembers by id but the inbox does not hold.

        A claim can outlive an attempt answered 503 (Redis ran the claim after
        the gateway stopped waiting for it): the inbox decides, so GitHub's
        redelivery of that id is stored, not turned away as a duplicate.
        """
        try:
            known = self._inbox.known([arrival.delivery_id for arrival in arrivals])
        except InboxUnavailable as exc:
            self._failed(arrivals, "inbox", exc)
            self._settle(arrivals, Outcome.INBOX_UNAVAILABLE)
            return []
        unknown = []
        for arrival in arrivals:
            if arrival.delivery_id in known:
                arrival.outcome = Outcome.DUPLICATE
            else:
                unknown.append(arrival)
        return unknown

    def _undo(self, arrivals: list[Arrival]) -> None:
        try:
            self._inbox.forget([arrival.delivery_id for arrival in arrivals])
        except InboxUnavailable as exc:
            # The rows stay `received`: the requeue sweep queues them, and GitHub's
            # redelivery is then a duplicate. Done once either way.
            self._failed(arrivals, "forget", exc)
        self._release(arrivals)

    def _release(self, arrivals: list[Arrival]) -> None:
        try:
            self._deduplicator.release([key for a in arrivals for key in a.claim_keys])
        except redis.RedisError as exc:
            # The keys expire by themselves; until then a redelivery is a duplicate.
            self._failed(arrivals, "release", exc)

    @staticmethod
    def _settle(arrivals: list[Arrival], outcome: Outcome) -> None:
        for arrival in arrivals:
            arrival.outcome = outcome

    @staticmethod
    def _failed(arrivals: list[Arrival], step: str, exc: BaseException) -> None:
        log.error(
            f"intake.{step}_failed",
            extra={
                "deliveries": [arrival.delivery_id for arrival in arrivals],
                "error": str(exc) or type(exc).__name__,
            },
        )
