"""``orders-stream``, the dashboard's live feed, as a real process on a real Redis.

What it promises: every message on the order channel reaches every open stream; a
client gets at most STREAM_MAX_PER_CLIENT streams (then 429 problem+json) while other
clients still get theirs; CORS only for pages of the same host; SIGTERM ends the
streams and exits 0; Redis going away ends each stream with a ``down`` event, and a
stream opened after Redis is back is live again.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis as redis_lib

from devtools.procs import http_ok
from devtools.redis_server import RedisServer, free_port
from messaging import keys
from tests.helpers import BIN, Proc, wait_for

TICKET = "a-ticket-orders-api-would-store"


class Stream:
    """A raw HTTP client of one event stream (optionally from another loopback address)."""

    def __init__(
        self,
        port: int,
        source: str = "127.0.0.1",
        origin: str | None = None,
        ticket: str | None = None,
    ) -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=10, source_address=(source, 0)
        )
        extra = f"Origin: {origin}\r\n" if origin else ""
        self.sock.sendall(
            f"GET /events/stream?ticket={TICKET if ticket is None else ticket} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\n{extra}"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        self.buffer = b""

    def read_until(self, needle: bytes, timeout: float = 10.0) -> bytes:
        """Everything received until ``needle`` (fails the test at the deadline)."""
        self.sock.settimeout(timeout)
        while needle not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                pytest.fail(f"stream closed before {needle!r}; got {self.buffer!r}")
            self.buffer += chunk
        return self.buffer

    def read_to_end(self, timeout: float = 10.0) -> bytes:
        """Everything until the server closes the connection."""
        self.sock.settimeout(timeout)
        while chunk := self.sock.recv(65536):
            self.buffer += chunk
        return self.buffer

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def start_stream(
    tmp_path: Path, redis_url: str, redis: redis_lib.Redis
) -> Iterator[Callable[..., tuple[Proc, int]]]:
    procs: list[Proc] = []

    def start(url: str = redis_url, **env: str) -> tuple[Proc, int]:
        grant(url)
        port = free_port()
        proc = Proc(
            [str(BIN / "orders-stream")],
            {
                "REDIS_URL": url,
                "HOST": "127.0.0.1",
                "STREAM_PORT": str(port),
                "STREAM_KEEPALIVE_SECONDS": "0.5",
                **env,
            },
            tmp_path / f"stream-{len(procs)}.log",
        )
        procs.append(proc)
        wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), 20, 0.05, "orders-stream")
        wait_for(lambda: _health(port)["subscribed"], 20, 0.05, "orders-stream subscribed")
        return proc, port

    yield start
    for proc in procs:
        if proc.alive():
            proc.terminate(10.0)


def grant(url: str) -> None:
    """The ticket orders-api stores for an operator's page."""
    client = redis_lib.Redis.from_url(url)
    client.set(keys.stream_ticket(TICKET), "1", ex=600)
    client.close()


def _health(port: int) -> dict[str, object]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def test_every_stream_gets_every_message_on_one_subscription(
    start_stream: Callable[..., tuple[Proc, int]], redis: redis_lib.Redis
) -> None:
    _, port = start_stream()
    streams = [Stream(port, f"127.0.0.{2 + i}") for i in range(5)]
    try:
        for s in streams:
            head = s.read_until(b"event: subscribed")
            assert b"HTTP/1.1 200" in head and b"text/event-stream" in head
        # One Redis subscription for the whole process, not one per client.
        assert redis.pubsub_numsub(keys.ORDER_EVENTS_CHANNEL)[0][1] == 1
        assert _health(port)["streams"] == 5
        redis.publish(keys.ORDER_EVENTS_CHANNEL, '{"type":"OrderPlaced","data":{"order_id":7}}')
        redis.publish(keys.ORDER_EVENTS_CHANNEL, "two\nlines")
        for s in streams:
            body = s.read_until(b"data: lines\n\n")
            assert b'data: {"type":"OrderPlaced","data":{"order_id":7}}\n\n' in body
            assert b"data: two\ndata: lines\n\n" in body
            s.read_until(b": keep-alive")  # an idle stream stays open with comments
    finally:
        for s in streams:
            s.close()
    wait_for(lambda: _health(port)["streams"] == 0, 10, 0.05, "closed streams forgotten")


def test_per_client_limit_answers_429_problem(
    start_stream: Callable[..., tuple[Proc, int]],
) -> None:
    _, port = start_stream(STREAM_MAX_PER_CLIENT="2")
    first, second = Stream(port), Stream(port)
    try:
        for s in (first, second):
            s.read_until(b"event: subscribed")
        third = Stream(port)
        answer = third.read_to_end()
        third.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 429")
        assert b"Content-Type: application/problem+json" in head
        assert b"Retry-After: 2" in head
        problem = json.loads(body)
        assert problem["status"] == 429 and "STREAM_MAX_PER_CLIENT" in problem["detail"]
        # Another client is not affected by this one's streams.
        other = Stream(port, "127.0.0.9")
        other.read_until(b"event: subscribed")
        other.close()
        # Closing one frees its place.
        first.close()
        wait_for(lambda: _health(port)["streams"] == 1, 10, 0.05, "the closed stream freed")
        again = Stream(port)
        again.read_until(b"event: subscribed")
        again.close()
    finally:
        first.close()
        second.close()


def test_a_stream_needs_a_ticket_orders_api_stored(
    start_stream: Callable[..., tuple[Proc, int]],
) -> None:
    _, port = start_stream()
    for ticket in ("", "not-a-ticket-anyone-stored"):
        refused = Stream(port, ticket=ticket)
        head, _, body = refused.read_to_end().partition(b"\r\n\r\n")
        refused.close()
        assert head.startswith(b"HTTP/1.1 401"), head
        assert json.loads(body)["status"] == 401


def test_cors_only_for_pages_of_the_same_host(
    start_stream: Callable[..., tuple[Proc, int]],
) -> None:
    _, port = start_stream()
    ours = Stream(port, origin="http://127.0.0.1:8000")
    theirs = Stream(port, origin="http://evil.example")
    try:
        assert b"Access-Control-Allow-Origin: http://127.0.0.1:8000\r\n" in ours.read_until(
            b"event: subscribed"
        )
        assert b"Access-Control-Allow-Origin" not in theirs.read_until(b"event: subscribed")
    finally:
        ours.close()
        theirs.close()


def test_sigterm_ends_the_streams_and_exits_0(
    start_stream: Callable[..., tuple[Proc, int]],
) -> None:
    proc, port = start_stream()
    stream = Stream(port)
    try:
        stream.read_until(b"event: subscribed")
        proc.popen.send_signal(signal.SIGTERM)
        assert b"event: bye" in stream.read_to_end()
        assert proc.popen.wait(60) == 0
    finally:
        stream.close()


def test_redis_lost_and_back(
    start_stream: Callable[..., tuple[Proc, int]],
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    server = redis_server_factory()
    _, port = start_stream(server.url)
    stream = Stream(port)
    try:
        stream.read_until(b"event: subscribed")
        server.kill()
        ended = stream.read_to_end(20)
        assert b"retry: 2000\nevent: down\n" in ended
    finally:
        stream.close()
    server.start()
    wait_for(lambda: _health(port)["subscribed"] is True, 30, 0.1, "subscribed again")
    grant(server.url)  # the restarted Redis lost the old ticket: the page asks for a new one
    back = Stream(port)
    try:
        back.read_until(b"event: subscribed")
        client = redis_lib.Redis.from_url(server.url)
        client.publish(keys.ORDER_EVENTS_CHANNEL, "after the restart")
        client.close()
        back.read_until(b"data: after the restart")
    finally:
        back.close()


def test_a_stream_ends_at_its_lifetime(start_stream: Callable[..., tuple[Proc, int]]) -> None:
    _, port = start_stream(STREAM_MAX_SECONDS="1")
    stream = Stream(port)
    try:
        ended = stream.read_to_end()
        assert b"event: subscribed" in ended
        assert b"retry: 100\nevent: bye\ndata: stream lifetime reached\n\n" in ended
    finally:
        stream.close()


def test_a_port_in_use_is_one_line_and_exit_1(
    start_stream: Callable[..., tuple[Proc, int]], redis_url: str
) -> None:
    _, port = start_stream()
    done = subprocess.run(
        [str(BIN / "orders-stream")],
        env={"REDIS_URL": redis_url, "HOST": "127.0.0.1", "STREAM_PORT": str(port)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert f"orders-stream: cannot listen on 127.0.0.1:{port}: " in lines[0], lines
    assert "Traceback" not in done.stderr
