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

A request gunicorn itself cannot parse never reaches Flask: a control character in a
header, a request line or header block over gunicorn's limits, a bad Content-Length, a
``SCRIPT_NAME`` header (honoured from the trusted forwarder addresses, 127.0.0.1 by
default) that the path does not start with. gunicorn answers those with an HTML page
(and the last one with a 500). :meth:`SheddingThreadWorker.handle_error` answers them as
the app answers bad input: a 4xx ``application/problem+json`` naming the part of the
request at fault (:func:`parse_problem`), and the connection is closed.
"""

from __future__ import annotations

import http
import json
import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from gunicorn.http import errors as http_errors
from gunicorn.workers.gthread import ThreadWorker

from orders.auth import SECURITY_HEADERS
from orders.validation import HEADER_NAME_RE, PROBLEM_CONTENT_TYPE, Problem, parse_detail

log = logging.getLogger("orders-api")

_current = threading.local()
"""The connection this pool thread is handling: how long it waited for the thread."""

_HANGUP = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

_STATUS: dict[type[Exception], int] = {
    # Where the exception's own ``code`` (400 when it has none) is not the answer.
    http_errors.LimitRequestLine: 414,
    http_errors.LimitRequestHeaders: 431,
    http_errors.ExpectationFailed: 417,
    http_errors.ConfigurationProblem: 400,  # gunicorn's 500: a SCRIPT_NAME header a client sent
    http_errors.UnsupportedTransferCoding: 400,  # RFC 9112: SHOULD 501; the client's to change
}
_FIELD: dict[type[Exception], str] = {
    # The part of the request at fault; header errors name their header, else "headers".
    http_errors.ConfigurationProblem: "SCRIPT_NAME",
    http_errors.LimitRequestLine: "request-target",
    http_errors.InvalidRequestLine: "request-line",
    http_errors.InvalidRequestMethod: "method",
    http_errors.InvalidHTTPVersion: "HTTP-version",
    http_errors.UnsupportedTransferCoding: "Transfer-Encoding",
    http_errors.ExpectationFailed: "Expect",
    http_errors.InvalidSchemeHeaders: "X-Forwarded-Proto",
    http_errors.ForbiddenProxyRequest: "PROXY",
}
_HEADER_ERRORS = (
    http_errors.InvalidHeader,
    http_errors.InvalidHeaderName,
    http_errors.ObsoleteFolding,
    http_errors.LimitRequestHeaders,
)


def _first(table: dict[type[Exception], Any], exc: BaseException) -> Any:
    return next((table[kind] for kind in type(exc).__mro__ if kind in table), None)


def parse_problem(exc: BaseException) -> Problem | None:
    """The 4xx problem for a request gunicorn could not parse; None for anything else.

    An invalid header the *application* sent (``InvalidResponseHeader``) is the app's
    error, not the client's: None, and gunicorn answers 500 as for any app error.
    """
    if not isinstance(exc, http_errors.ParseException) or isinstance(
        exc, (http_errors.InvalidResponseHeader, http_errors.InvalidResponseHeaderName)
    ):
        return None
    status = _first(_STATUS, exc) or getattr(exc, "code", 400)
    if not 400 <= status < 500:
        status = 400
    field_name = _first(_FIELD, exc)
    if field_name is None and isinstance(exc, _HEADER_ERRORS):
        name = str(getattr(exc, "hdr", ""))
        named = HEADER_NAME_RE.fullmatch(name) and not isinstance(
            exc, http_errors.InvalidHeaderName
        )
        field_name = "-".join(part.capitalize() for part in name.split("-")) if named else "headers"
    title = http.HTTPStatus(status).phrase
    detail = parse_detail(str(exc))
    errors = [{"field": field_name or "request", "message": detail}]
    return Problem(status, "-".join(title.lower().split()), title, detail, errors)


def problem_bytes(problem: Problem) -> bytes:
    """A whole HTTP/1.1 response for ``problem``, closing the connection."""
    body = json.dumps(problem.to_dict()).encode()
    head = [
        f"HTTP/1.1 {problem.status} {http.HTTPStatus(problem.status).phrase}",
        "Connection: close",
        f"Content-Type: {PROBLEM_CONTENT_TYPE}",
        f"Content-Length: {len(body)}",
        *(f"{name}: {value}" for name, value in SECURITY_HEADERS.items()),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


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

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        """A request gunicorn could not parse: 4xx problem+json (:func:`parse_problem`).

        Anything else (the app's own failure) is gunicorn's, as before: a 500.
        """
        problem = parse_problem(exc)
        if problem is None:
            super().handle_error(req, client, addr, exc)
            return
        self.log.warning("Invalid request from ip=%s: %s", (addr or ("",))[0], problem.detail)
        try:
            client.settimeout(1.0)
            client.sendall(problem_bytes(problem))
        except OSError:
            self.log.debug("could not send the %d answer", problem.status)


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
                Problem(
                    503,
                    "overloaded",
                    "Server overloaded",
                    f"the request waited {waited:.1f} s for a worker thread "
                    f"(REQUEST_QUEUE_TIMEOUT_SECONDS {queue_timeout:g}); it was not "
                    "carried out, retry it",
                ).to_dict()
            ).encode()
            start_response(
                "503 Service Unavailable",
                [
                    ("Content-Type", PROBLEM_CONTENT_TYPE),
                    ("Content-Length", str(len(body))),
                    ("Retry-After", "1"),
                    *SECURITY_HEADERS.items(),
                ],
            )
            return [body]
        return app(environ, start_response)

    return wrapped
