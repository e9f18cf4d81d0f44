"""A crowd of dashboard event streams, for tests, ``make chaos`` and the benchmarks.

:class:`StreamCrowd` opens N Server-Sent Events streams on ``orders-stream``, each from
its own loopback address (Linux routes all of 127.0.0.0/8 to ``lo``), as N browsers
would, so the per-client limit is not what stops them. A thread reads every stream, as
a browser does, so the server is never held up by full socket buffers, and counts the
streams that said ``subscribed`` and the events they received.
"""

from __future__ import annotations

import selectors
import socket
import threading
from types import TracebackType


def source_address(n: int) -> str:
    """The n-th loopback client address: 127.0.0.2, 127.0.0.3, ... (n < 62500)."""
    return f"127.0.{n // 250}.{2 + n % 250}"


def grant_ticket(redis_url: str, seconds: int = 3600) -> str:
    """Store a feed ticket in Redis, as orders-api does for an operator's page."""
    import secrets

    import redis

    from messaging import keys

    ticket = secrets.token_urlsafe(24)
    client = redis.Redis.from_url(redis_url)
    try:
        client.set(keys.stream_ticket(ticket), "1", ex=seconds)
    finally:
        client.close()
    return ticket


def open_stream(port: int, n: int, ticket: str, host: str = "127.0.0.1") -> socket.socket:
    """Send ``GET /events/stream`` from :func:`source_address` ``n``; the socket is open."""
    sock = socket.create_connection((host, port), timeout=15, source_address=(source_address(n), 0))
    sock.sendall(
        f"GET /events/stream?ticket={ticket} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    )
    return sock


class StreamCrowd:
    """``count`` open streams on ``port`` (one ``ticket``), read by a thread until :meth:`close`."""

    def __init__(self, port: int, count: int, ticket: str) -> None:
        self.count = count
        self._socks = [open_stream(port, n, ticket) for n in range(count)]
        self._by_fd = {sock.fileno(): sock for sock in self._socks}
        self._selector = selectors.DefaultSelector()
        for sock in self._socks:
            sock.setblocking(False)
            self._selector.register(sock, selectors.EVENT_READ)
        self._subscribed: set[int] = set()
        self._tails: dict[int, bytes] = {}
        self.closed = 0
        """Streams the server ended."""
        self.events = 0
        """JSON events received, all streams together."""
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, name="stream-crowd", daemon=True)
        self._thread.start()

    @property
    def live(self) -> int:
        """Streams that said ``subscribed`` and are still open."""
        with self._lock:
            return len(self._subscribed)

    def _read(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(0.1):
                try:
                    chunk = self._by_fd[key.fd].recv(65536)
                except OSError:
                    chunk = b""
                with self._lock:
                    if not chunk:
                        self._selector.unregister(key.fd)
                        self._subscribed.discard(key.fd)
                        self.closed += 1
                        continue
                    tail = self._tails.get(key.fd, b"")
                    data = tail + chunk
                    if b"event: subscribed" in data:
                        self._subscribed.add(key.fd)
                    self.events += data.count(b"data: {") - tail.count(b"data: {")
                    self._tails[key.fd] = data[-32:]

    def close(self) -> None:
        """Stop reading and close every stream."""
        self._stop.set()
        self._thread.join(5)
        self._selector.close()
        for sock in self._socks:
            sock.close()

    def __enter__(self) -> StreamCrowd:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
