"""What the HTTP servers answer to bytes that are not a valid request, for real.

The raw bytes go over a socket to a real ``orders-api`` (gunicorn) and ``orders-stream``
(aiohttp) and a consumer's metrics server (``METRICS_PORT``, the standard library's):
a control character in a header, a header block or request line over the limits, a bad
Content-Length, a ``SCRIPT_NAME`` the path does not start with (gunicorn answered that
one with a 500), an unknown path or method on the stream server. Each answer is a 4xx
``application/problem+json`` naming the part at fault, never an HTML or plain-text
page, and the server goes on answering.
"""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from devtools.redis_server import free_port
from tests.helpers import BIN, Proc, wait_for

pytestmark = pytest.mark.e2e


def _exchange(port: int, request: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
    """Send ``request``; (status, headers, JSON body) of the answer, read to the end."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                None,
            )
            if sep and length is not None and len(body) >= length:
                break
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)


HOST = b"Host: 127.0.0.1\r\n"


def _request(head: bytes, *headers: bytes, body: bytes = b"") -> bytes:
    """``head`` (``b"GET /healthz"``), then a Host header and ``headers``, then ``body``."""
    return head + b" HTTP/1.1\r\n" + HOST + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


API_CASES = [
    (
        "control character in a header",
        _request(b"POST /orders", b"Idempotency-Key: a\x01b", b"Content-Length: 2", body=b"{}"),
        400,
        "Idempotency-Key",
    ),
    ("not a request line", b"GARBAGE\r\n\r\n", 400, "request-line"),
    (
        "a header over the size limit",
        _request(b"GET /healthz", b"X-A: " + b"a" * 9000),
        431,
        "headers",
    ),
    ("a request target over the limit", _request(b"GET /" + b"a" * 9000), 414, "request-target"),
    (
        "a bad Content-Length",
        _request(b"POST /orders", b"Content-Length: abc"),
        400,
        "Content-Length",
    ),
    ("a space in a header name", _request(b"GET /healthz", b"Bad Header: 1"), 400, "headers"),
    (
        "SCRIPT_NAME the path does not start with",
        _request(b"GET /healthz", b"SCRIPT_NAME: /elsewhere"),
        400,
        "SCRIPT_NAME",
    ),
]

STREAM_CASES = [
    ("control character in a header", _request(b"GET /healthz", b"X-A: a\x01b"), 400, "headers"),
    ("not a request line", b"GARBAGE\r\n\r\n", 400, "method"),
    (
        "a bad Content-Length",
        _request(b"POST /healthz", b"Content-Length: abc"),
        400,
        "Content-Length",
    ),
]


def test_unparseable_requests_get_problem_json_naming_the_part(start_api: type) -> None:
    api = start_api(WEB_CONCURRENCY="1", WEB_THREADS="2")
    for port, cases in ((api.port, API_CASES), (api.stream_port, STREAM_CASES)):
        for name, request, status, field in cases:
            got, headers, body = _exchange(port, request)
            assert (got, headers["content-type"].split(";")[0]) == (
                status,
                "application/problem+json",
            ), name
            assert body["status"] == status, name
            assert body["errors"][0]["field"] == field, (name, body)
            assert "<" not in json.dumps(body), name  # no HTML page inside either
            # The server goes on answering.
            ok, _, health = _exchange(port, _request(b"GET /healthz", b"Connection: close"))
            assert (ok, health["status"]) == (200, "ok"), name
    # The stream server's unknown path and method: problem+json too (405 keeps Allow).
    got, _, body = _exchange(api.stream_port, _request(b"GET /nope", b"Connection: close"))
    assert (got, body["status"]) == (404, 404)
    got, headers, body = _exchange(
        api.stream_port, _request(b"POST /healthz", b"Content-Length: 0")
    )
    assert (got, body["status"], headers["allow"]) == (405, 405, "GET,HEAD")
    assert "Invalid request from ip=127.0.0.1" in api.api.output()


METRICS_CASES = [
    ("not a request line", b"GARBAGE\r\n\r\n", 400, "request-line"),
    ("an unsupported version", b"GET /metrics HTTP/2.0\r\n" + HOST + b"\r\n", 400, "HTTP-version"),
    (
        "over 100 headers",
        _request(b"GET /metrics", *[b"X-%d: 1" % i for i in range(120)]),
        431,
        "headers",
    ),
    (
        "a request line over 64 KiB",
        b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
        414,
        "request-target",
    ),
]


def test_a_consumers_metrics_server_answers_problem_json_too(
    tmp_path: Path, redis_url: str
) -> None:
    port = free_port()
    env = {"REDIS_URL": redis_url, "METRICS_PORT": str(port), "REDIS_CONNECT_ATTEMPTS": "1"}
    consumer = Proc([str(BIN / "consumer"), "noop"], env, tmp_path / "noop.log")
    url = f"http://127.0.0.1:{port}/metrics"

    def scraped() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return b"consumer_events" in response.read()
        except OSError:
            return False

    try:
        wait_for(scraped, 30, 0.05, "the consumer's metrics")
        for name, request, status, field in METRICS_CASES:
            got, headers, body = _exchange(port, request)
            assert (got, headers["content-type"]) == (status, "application/problem+json"), name
            assert (body["status"], body["errors"][0]["field"]) == (status, field), (name, body)
            assert scraped(), name  # and it goes on serving
    finally:
        consumer.terminate(20.0)
