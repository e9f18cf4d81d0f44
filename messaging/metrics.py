"""A consumer process's own Prometheus metrics, served on METRICS_PORT (0 = off).

Only what this process alone knows: events it handled or failed, and the end-to-end
latency from an event's timestamp (for OrderPlaced: the order placed) to its handling
here. Queue depths and the queues' processed/failed totals live in Redis and are read
at scrape time by the order service's ``/metrics``, so that ten consumers of one
queue do not report the same depth ten times.

The server is prometheus_client's WSGI app on the standard library's threading WSGI
server, as ``prometheus_client.start_http_server`` builds it, with one change: a request
the server cannot parse (a request line that is not one, an HTTP version it does not
speak, a request line over 64 KiB, more than 100 headers) is answered with a 4xx
``application/problem+json`` naming the part at fault, as the order service answers bad
input, instead of the standard library's HTML page (:class:`ProblemHandler`).
"""

from __future__ import annotations

import http
import json
import logging
import threading
from datetime import UTC, datetime
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

log = logging.getLogger(__name__)

HANDLED = Counter(
    "consumer_events",
    "Events this process settled, by queue and outcome (handled, failed).",
    ["queue", "outcome"],
)
END_TO_END = Histogram(
    "consumer_end_to_end_seconds",
    "Seconds from the event's timestamp (an OrderPlaced: the order placed) to handled here.",
    ["queue", "type"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
)

HEALTHY = Gauge(
    "consumer_healthy",
    "1 while every handler thread of this worker is alive and not stuck, else 0.",
    ["queue"],
)


def set_healthy(queue: str, healthy: bool) -> None:
    """The liveness gauge (0 just before an unhealthy worker exits)."""
    HEALTHY.labels(queue).set(1 if healthy else 0)


def event_age(event: dict[str, Any], now: datetime | None = None) -> float | None:
    """Seconds since the envelope's timestamp, or None when it has no usable one."""
    raw = event.get("timestamp")
    if not isinstance(raw, str):
        return None
    try:
        stamp = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None
    if stamp.tzinfo is None:
        return None
    return max(0.0, ((now or datetime.now(UTC)) - stamp).total_seconds())


def observe_handled(queue: str, event: dict[str, Any]) -> None:
    """Count a handled event and observe its end-to-end latency."""
    HANDLED.labels(queue, "handled").inc()
    age = event_age(event)
    if age is not None:
        END_TO_END.labels(queue, str(event.get("type"))).observe(age)


def observe_failed(queue: str) -> None:
    """Count a failed attempt."""
    HANDLED.labels(queue, "failed").inc()


_PARSE_FIELDS: tuple[tuple[str, str], ...] = (
    # Words of http.server's messages -> the part of the request at fault.
    ("version", "HTTP-version"),
    ("header", "headers"),
    ("syntax", "request-line"),
    ("request type", "method"),
)


class ProblemHandler(WSGIRequestHandler):
    """The WSGI request handler, quiet, answering unparseable requests with problem+json."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        """No access log per scrape (prometheus_client's handler is as quiet)."""

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """A 4xx ``application/problem+json`` (an unsupported version too: 400), then close."""
        status = http.HTTPStatus(
            400 if code == http.HTTPStatus.HTTP_VERSION_NOT_SUPPORTED else code
        )
        detail = " ".join((message or status.description or status.phrase).split())[:200]
        lowered = detail.lower()
        field = next((name for word, name in _PARSE_FIELDS if word in lowered), "request")
        if code == http.HTTPStatus.REQUEST_URI_TOO_LONG:
            field = "request-target"
        body = json.dumps(
            {
                "type": "about:blank",
                "title": status.phrase,
                "status": int(status),
                "detail": detail,
                "errors": [{"field": field, "message": detail}],
            }
        ).encode()
        log.info("metrics: refused a request from %s: %s", self.client_address[0], detail)
        self.close_connection = True
        # A request line it refused leaves the version at HTTP/0.9, whose answers have no
        # status line or headers: this one has both.
        self.request_version = self.protocol_version
        self.send_response(status, status.phrase)
        self.send_header("Connection", "close")
        self.send_header("Content-Type", "application/problem+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def serve(port: int) -> ThreadingWSGIServer:
    """Serve /metrics on ``port`` in a daemon thread (all interfaces: containers)."""
    server = make_server(
        "0.0.0.0", port, make_wsgi_app(), ThreadingWSGIServer, handler_class=ProblemHandler
    )
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("metrics on http://0.0.0.0:%d/metrics", port)
    return server
