"""orders-api's gunicorn worker: requests nobody waits for any more are not carried out.

Why: gunicorn's ``gthread`` worker accepts every connection at once and queues it for
its thread pool. When all threads are busy (a burst, a slow database), a request can sit
in that queue far longer than its client waits: the client times out, gives up (and, if
careful, retries with its Idempotency-Key), and the abandoned ``POST /orders`` was still
carried out 24 s later. Two checks, right before the app runs:

- the client closed its connection (``POLLRDHUP``/``POLLHUP`` on the socket, Linux):
  nobody will read the answer, so the request is dropped unanswered;
- the request waited in the queue longer than ``REQUEST_QUEUE_TIMEOUT_SECONDS``: it is
  answered 503 problem+json with ``Retry-After`` (a careful client retries; the app
  never saw the request, so nothing happened twice).

:class:`SheddingThreadWorker` stamps each connection when it is queued;
:func:`shed_stale_requests` wraps the WSGI app and does the checks.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from gunicorn.workers.gthread import ThreadWorker

log = logging.getLogger("orders-api")

_current = threading.local()
"""The connection this pool thread is handling: how long it waited for the thread."""

_HANGUP = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class SheddingThreadWorker(ThreadWorker):  # type: ignore[misc]
    """gthread, plus the time each connection was queued for a thread."""

    def enqueue_req(self, conn: Any) -> None:
        """Stamp the connection, then queue it as gthread does."""
        conn.queued_at = time.monotonic()
        super().enqueue_req(conn)

    def handle(self, conn: Any) -> Any:
        """Runs in a pool thread: tell the WSGI wrapper how long the connection waited.

        Measured up to here, not to the app call: a slow client's upload is not queueing.
        """
        queued_at = getattr(conn, "queued_at", None)
        _current.waited = None if queued_at is None else time.monotonic() - queued_at
        try:
            return super().handle(conn)
        finally:
            _current.waited = None


def client_gone(sock: socket.socket | None) -> bool:
    """True if the peer has closed the connection (or it failed); False if unknown."""
    if sock is None or not _HANGUP:
        return False
    poller = select.poll()
    try:
        poller.register(sock, _HANGUP)
        return any(events & _HANGUP for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def queued_seconds() -> float | None:
    """How long the current request waited for a thread (None outside the worker)."""
    return getattr(_current, "waited", None)  # type: ignore[no-any-return]


def shed_stale_requests(app: WsgiApp, queue_timeout: float) -> WsgiApp:
    """Wrap ``app``: drop requests whose client left, 503 those queued too long."""

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        where = f"{environ.get('REQUEST_METHOD')} {environ.get('PATH_INFO')}"
        if client_gone(environ.get("gunicorn.socket")):
            log.warning("dropped %s: the client closed the connection before it ran", where)
            start_response("499 Client Closed Request", [("Connection", "close")])
            return [b""]
        waited = queued_seconds()
        if waited is not None and waited > queue_timeout:
            log.warning("shed %s: it waited %.1f s for a thread", where, waited)
            body = json.dumps(
                {
                    "type": "overloaded",
                    "title": "Server overloaded",
                    "status": 503,
                    "detail": (
                        f"the request waited {waited:.1f} s for a worker thread "
                        f"(REQUEST_QUEUE_TIMEOUT_SECONDS {queue_timeout:g}); it was not "
                        "carried out, retry it"
                    ),
                }
            ).encode()
            start_response(
                "503 Service Unavailable",
                [
                    ("Content-Type", "application/problem+json"),
                    ("Content-Length", str(len(body))),
                    ("Retry-After", "1"),
                ],
            )
            return [body]
        return app(environ, start_response)

    return wrapped
