"""A closed-loop HTTP load generator: fixed concurrency, keep-alive, bounded.

Each of `concurrency` threads keeps one connection open and sends its next
request as soon as the answer to the last one is read, the way `wrk` does. The
client is a few lines over a socket rather than http.client, whose header parsing
would cost more CPU than the bare server it measures (both share two cores).
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.delivery import Delivery

RECV_BYTES = 65536


class ConnectionClosed(ConnectionError):
    """The server closed the connection before a whole answer came back."""


@dataclass
class LoadResult:
    """What one load run saw: answers by status, latencies, accepted ids."""

    concurrency: int
    seconds: float = 0.0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    accepted_status: int = 202

    @property
    def sent(self) -> int:
        """Return how many requests got an answer or an error."""
        return sum(self.statuses.values()) + sum(self.errors.values())

    @property
    def per_second(self) -> float:
        """Return accepted answers per second of the run."""
        return self.statuses[self.accepted_status] / self.seconds if self.seconds else 0

    def percentile(self, fraction: float) -> float:
        """Return a latency percentile in milliseconds (nearest rank)."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        index = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
        return ordered[index] * 1000

    def summary(self) -> dict[str, object]:
        """Return the numbers the report keeps."""
        return {
            "concurrency": self.concurrency,
            "seconds": round(self.seconds, 3),
            "requests": self.sent,
            "statuses": {str(status): n for status, n in sorted(self.statuses.items())},
            "errors": dict(self.errors),
            "accepted_per_second": round(self.per_second, 1),
            "p50_ms": round(self.percentile(0.50), 3),
            "p99_ms": round(self.percentile(0.99), 3),
        }


class Client:
    """One keep-alive HTTP/1.1 connection that reconnects when the server closes."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self._address = (host, port)
        self._timeout = timeout
        self._socket: socket.socket | None = None
        self._buffer = b""

    def close(self) -> None:
        """Close the connection."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self._buffer = b""

    def send(self, request: bytes) -> tuple[int, bytes]:
        """Send one whole request; return the status and the body of the answer."""
        if self._socket is None:
            self._socket = socket.create_connection(self._address, self._timeout)
            self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._socket.sendall(request)
        status, body, keep_alive = self._read()
        if not keep_alive:
            self.close()
        return status, body

    def _recv(self) -> bytes:
        assert self._socket is not None
        chunk = self._socket.recv(RECV_BYTES)
        if not chunk:
            raise ConnectionClosed("the server closed the connection")
        return chunk

    def _read(self) -> tuple[int, bytes, bool]:
        while b"\r\n\r\n" not in self._buffer:
            self._buffer += self._recv()
        head, _, rest = self._buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            rest += self._recv()
        body, self._buffer = rest[:length], rest[length:]
        keep_alive = headers.get("connection") != "close" and lines[0].startswith(
            "HTTP/1.1"
        )
        return status, body, keep_alive


def drive(
    host: str,
    port: int,
    make: Callable[[int], Delivery],
    concurrency: int,
    duration: float,
    max_requests: int,
    accepted_status: int = 202,
    timeout: float = 10.0,
) -> LoadResult:
    """Send deliveries from `make(0)`, `make(1)`, ... until either bound is reached.

    Stops after `max_requests` requests or `duration` seconds, whichever comes
    first; each thread finishes the request it has in flight.
    """
    result = LoadResult(concurrency=concurrency, accepted_status=accepted_status)
    lock = threading.Lock()
    sequence = iter(range(max_requests))
    authority = f"{host}:{port}"
    start = time.perf_counter()
    deadline = start + duration

    def worker() -> None:
        client = Client(host, port, timeout)
        latencies: list[float] = []
        statuses: Counter[int] = Counter()
        errors: Counter[str] = Counter()
        accepted: list[str] = []
        try:
            while time.perf_counter() < deadline:
                with lock:
                    number = next(sequence, None)
                if number is None:
                    break
                delivery = make(number)
                request = delivery.request(authority)
                sent_at = time.perf_counter()
                try:
                    status, _ = client.send(request)
                except (OSError, ValueError, IndexError) as exc:
                    errors[type(exc).__name__] += 1
                    client.close()
                    continue
                latencies.append(time.perf_counter() - sent_at)
                statuses[status] += 1
                if status == accepted_status:
                    accepted.append(delivery.delivery_id)
        finally:
            client.close()
            with lock:
                result.latencies.extend(latencies)
                result.statuses.update(statuses)
                result.errors.update(errors)
                result.accepted.extend(accepted)

    threads = [
        threading.Thread(target=worker, name=f"load-{n}", daemon=True)
        for n in range(concurrency)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(duration + timeout + 5)
    result.seconds = time.perf_counter() - start
    return result
