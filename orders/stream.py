"""Console script ``orders-stream``: the dashboard's live feed, on its own async server.

Why a process of its own: a Server-Sent Events stream lives for minutes. Served by
orders-api's gunicorn threads, twenty anonymous streams took every thread and intake
(``POST /orders``, ``/healthz``) stopped. Here one asyncio event loop (aiohttp) holds
every stream: an open stream costs a coroutine and a socket, not a thread, so hundreds
of them leave orders-api's capacity untouched. The order service's page points its
``EventSource`` at this server (``STREAM_URL``, by default the page's host on
``STREAM_PORT``); orders-api's own ``/events/stream`` answers a redirect here, so it
never holds a thread either.

- One Redis subscription per process, not one per client: a hub thread SUBSCRIBEs to
  :data:`~messaging.keys.ORDER_EVENTS_CHANNEL` (the synchronous client from
  :mod:`messaging.connection`, so TLS and Redis Cluster work as everywhere else) and fans
  each message out to every open stream's bounded buffer. A client too slow to keep up
  is disconnected (its browser reconnects) rather than buffered without bound.
- Only operators: a stream needs ``?ticket=``, a random key orders-api stores in Redis
  for an operator's dashboard page (:func:`orders.dashboard.stream_url`); without one,
  401 problem+json.
- Limits: at most ``STREAM_MAX_PER_CLIENT`` open streams per client address (beyond:
  429 problem+json with ``Retry-After``) and ``STREAM_MAX_CONNECTIONS`` in all (503).
- Pub/sub is live only: what was published before a stream opened is not replayed. A
  stream sends a keep-alive comment every ``STREAM_KEEPALIVE_SECONDS`` and ends after
  ``STREAM_MAX_SECONDS`` (the browser's EventSource reconnects by itself). While Redis
  is unreachable each stream gets a ``down`` event and ends, telling the browser when to
  reconnect (``retry:``); it never answers an error status, which would make
  EventSource give up.
- Cross-origin: the page lives on orders-api's port, so the stream answers CORS
  (``Access-Control-Allow-Origin``) for pages served from the same host name only.
- ``GET /healthz``: ``{"status": "ok", "streams": N, "subscribed": bool}``.
- Every error answer is ``application/problem+json``: an unknown path (404), a method
  other than GET or HEAD (405, with ``Allow``), and a request aiohttp cannot parse (a
  control character in a header, a request line or header over its limits, a bad
  Content-Length: 400, naming the part at fault; :class:`ProblemRequestHandler`).
- SIGTERM or SIGINT: every stream ends at once (``bye``), then the process exits 0. A
  port it cannot listen on (in use, or privileged) is one line and exit 1.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import redis
from aiohttp import http_exceptions, web, web_protocol, web_server

from messaging import keys, logs
from messaging.config import command_line, load_settings
from messaging.connection import redis_client
from orders.config import OrderServiceSettings
from orders.validation import HEADER_NAME_RE, PROBLEM_CONTENT_TYPE, Problem, parse_detail

log = logging.getLogger("orders-stream")

RECONNECT_MS = 2000
"""What ``retry:`` tells the browser: milliseconds before it reconnects the stream."""
POLL_SECONDS = 1.0
"""How long the hub's wait for a pub/sub message lasts (its stop check runs between)."""
CLIENT_BUFFER = 1000
"""Messages buffered for one stream; a client further behind is disconnected."""

BATCH = 200
"""Most pub/sub messages the hub hands to the event loop in one go."""

EXIT_CANNOT_LISTEN = 1
_CANNOT_BIND = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})
"""The errnos of a bind that failed (asyncio's ``create_server``)."""


def sse_event(data: str, event: str | None = None) -> str:
    """One SSE event; every line of ``data`` becomes its own ``data:`` field."""
    head = f"event: {event}\n" if event else ""
    lines = data.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return head + "".join(f"data: {line}\n" for line in lines) + "\n"


def _problem(
    status: int, kind: str, title: str, detail: str, errors: list[dict[str, str]] | None = None
) -> web.Response:
    body = Problem(status, kind, title, detail, errors or []).to_dict()
    response = web.Response(status=status, text=json.dumps(body))
    response.content_type = PROBLEM_CONTENT_TYPE
    response.force_close()  # a refused client does not keep a socket here either
    return response


_PARSE_FIELDS: tuple[tuple[type[Exception], str], ...] = (
    # aiohttp's parse error -> the part of the request at fault; the first match wins.
    (http_exceptions.InvalidHeader, "headers"),
    (http_exceptions.BadHttpMethod, "method"),
    (http_exceptions.BadStatusLine, "request-line"),
    (http_exceptions.InvalidURLError, "request-target"),
    (http_exceptions.LineTooLong, "request-line or headers"),
    (http_exceptions.TransferEncodingError, "Transfer-Encoding"),
    (http_exceptions.ContentLengthError, "Content-Length"),
)
_PARSE_WORDS: tuple[tuple[str, str], ...] = (
    # Words of the C parser's messages -> the part at fault; the first match wins.
    ("content-length", "Content-Length"),
    ("transfer-encoding", "Transfer-Encoding"),
    ("chunk", "body"),
    ("header", "headers"),
    ("method", "method"),
    ("version", "HTTP-version"),
    ("url", "request-target"),
)


def parse_problem(status: int, exc: BaseException | None, message: str | None) -> web.Response:
    """The problem+json answer to a request the HTTP parser refused (status 4xx)."""
    detail = " ".join((message or str(exc or "") or "the request is not valid HTTP/1.1").split())
    field_name = next((name for kind, name in _PARSE_FIELDS if isinstance(exc, kind)), "")
    if isinstance(exc, http_exceptions.InvalidHeader) and HEADER_NAME_RE.fullmatch(exc.hdr or ""):
        field_name = exc.hdr
    if not field_name:  # the C parser names the part in its message
        lowered = detail.lower()
        field_name = next((name for word, name in _PARSE_WORDS if word in lowered), "request")
    detail = parse_detail(detail)
    errors = [{"field": field_name, "message": detail}]
    return _problem(status, "bad-request", "Bad request", detail, errors)


class ProblemRequestHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler; a request it cannot parse gets problem+json.

    aiohttp answers those itself, before any route or middleware, in plain text. Its
    server makes each connection's handler from ``aiohttp.web_server.RequestHandler``;
    :func:`main` points that name here. Errors of the app itself (500) stay aiohttp's.
    """

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A 4xx parse error as problem+json; anything else as aiohttp answers it."""
        if not 400 <= status < 500:
            return super().handle_error(request, status, exc, message)
        log.info("refused a request from %s: %s", request.remote, message or exc)
        return parse_problem(status, exc, message)


@web.middleware
async def problem_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """An HTTP error the router raises (404, 405) as problem+json, its headers kept."""
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        detail = {
            404: f"there is no {request.path[:100]!r} here: GET /events/stream or /healthz",
            405: f"{request.method} is not allowed here; use {exc.headers.get('Allow', 'GET')}",
        }.get(exc.status, exc.reason)
        response = _problem(exc.status, "about:blank", exc.reason, detail)
        for name in ("Allow", "Retry-After"):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response


def _frame(text: str, event: str | None = None, retry_ms: int | None = None) -> bytes:
    head = f"retry: {retry_ms}\n" if retry_ms is not None else ""
    return (head + sse_event(text, event)).encode()


DOWN = _frame("redis unavailable", "down", RECONNECT_MS)
"""Last frame of every stream when Redis is lost (the browser retries in 2 s)."""
SLOW = _frame("client too slow", "bye", 100)
"""Last frame of a stream that fell CLIENT_BUFFER messages behind."""
STOPPING = _frame("server stopping", "bye", RECONNECT_MS)
"""Last frame of every stream when the server shuts down."""


@dataclass(eq=False)
class Client:
    """One open stream's buffer: frames to write, and the frame that ends it."""

    frames: list[bytes] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    last: bytes | None = None

    def end(self, frame: bytes) -> None:
        """Write ``frame`` after what is buffered, then close (first end wins)."""
        if self.last is None:
            self.last = frame
            self.wake.set()


@dataclass
class Hub:
    """The one Redis subscription of this process and the streams it feeds.

    The subscriber runs in a thread (a blocking ``get_message``); everything touching
    ``clients`` runs on the event loop (the thread hands batches of encoded frames over
    with ``call_soon_threadsafe``). A message is encoded once, not once per client, and
    a client woken for several frames writes them in one go: fan-out stays cheap.
    """

    client: redis.Redis
    loop: asyncio.AbstractEventLoop
    clients: set[Client] = field(default_factory=set)
    subscribed: bool = False
    stopping: threading.Event = field(default_factory=threading.Event)

    def start(self) -> threading.Thread:
        """Start the subscriber thread."""
        thread = threading.Thread(target=self._run, name="stream-hub", daemon=True)
        thread.start()
        return thread

    def _fan_out(self, frames: list[bytes]) -> None:
        for client in self.clients:
            if client.last is not None:
                continue
            if len(client.frames) + len(frames) > CLIENT_BUFFER:
                # Too far behind: drop what it has and tell it to go (its browser
                # reconnects and starts from the live edge again).
                client.frames.clear()
                client.end(SLOW)
            else:
                client.frames.extend(frames)
                client.wake.set()

    def end_all(self, frame: bytes) -> None:
        """End every open stream with ``frame`` (on the event loop)."""
        for client in self.clients:
            client.end(frame)

    def _set_subscribed(self, value: bool) -> None:
        self.subscribed = value
        if not value:
            self.end_all(DOWN)

    @staticmethod
    def _text(message: dict[str, object]) -> str:
        raw = message["data"]
        return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)

    def _run(self) -> None:
        while not self.stopping.is_set():
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(keys.ORDER_EVENTS_CHANNEL)
                self.loop.call_soon_threadsafe(self._set_subscribed, True)
                log.info("subscribed to %s", keys.ORDER_EVENTS_CHANNEL)
                while not self.stopping.is_set():
                    message = pubsub.get_message(timeout=POLL_SECONDS)
                    frames: list[bytes] = []
                    while message is not None and len(frames) < BATCH:
                        if message.get("type") == "message":
                            frames.append(sse_event(self._text(message)).encode())
                        message = pubsub.get_message(timeout=0)  # what is already here
                    if message is not None and message.get("type") == "message":
                        frames.append(sse_event(self._text(message)).encode())
                    if frames:
                        self.loop.call_soon_threadsafe(self._fan_out, frames)
            except (redis.RedisError, OSError) as exc:
                log.warning("lost Redis: %s; subscribing again in %d ms", exc, RECONNECT_MS)
                self.loop.call_soon_threadsafe(self._set_subscribed, False)
                self.stopping.wait(RECONNECT_MS / 1000)
            finally:
                try:
                    pubsub.close()
                except (redis.RedisError, OSError):
                    pass


@dataclass
class StreamServer:
    """The aiohttp application and its limits."""

    settings: OrderServiceSettings
    hub: Hub | None = None
    per_client: Counter[str] = field(default_factory=Counter)
    open_streams: int = 0

    def app(self) -> web.Application:
        """The routes: ``/events/stream`` and ``/healthz``."""
        app = web.Application(middlewares=[problem_errors])
        app.router.add_get("/events/stream", self.stream)
        app.router.add_get("/healthz", self.healthz)
        app.on_startup.append(self._start_hub)
        app.on_shutdown.append(self._stop)
        return app

    async def _start_hub(self, _app: web.Application) -> None:
        client = redis_client(self.settings.base, socket_timeout=POLL_SECONDS + 5)
        self.hub = Hub(client=client, loop=asyncio.get_running_loop())
        self.hub.start()

    async def _stop(self, _app: web.Application) -> None:
        if self.hub is not None:
            self.hub.stopping.set()
            self.hub.end_all(STOPPING)

    async def healthz(self, _request: web.Request) -> web.Response:
        """Liveness and the number of open streams."""
        subscribed = self.hub is not None and self.hub.subscribed
        return web.json_response(
            {"status": "ok", "streams": self.open_streams, "subscribed": subscribed}
        )

    async def _ticket_valid(self, ticket: str) -> bool | None:
        """True/False: the ticket is/is not in Redis; None: Redis did not answer."""
        if self.hub is None or not 16 <= len(ticket) <= 64 or not ticket.isascii():
            return False
        key = keys.stream_ticket(ticket)
        try:  # the sync client, off the event loop (one short round trip)
            found = await asyncio.get_running_loop().run_in_executor(
                None, self.hub.client.exists, key
            )
        except (redis.RedisError, OSError):
            return None
        return bool(found)

    def _cors(self, request: web.Request) -> dict[str, str]:
        origin = request.headers.get("Origin")
        if not origin:
            return {}
        origin_host = urlsplit(origin).hostname
        if origin_host and origin_host == urlsplit(f"//{request.host}").hostname:
            return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        return {"Vary": "Origin"}

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: the order channel, live (see the module docstring)."""
        s = self.settings
        client = request.remote or "unknown"
        valid = await self._ticket_valid(request.query.get("ticket", ""))
        if valid is None:  # Redis does not answer: say so, the browser retries
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            response.force_close()
            await response.prepare(request)
            await response.write(DOWN)
            return response
        if not valid:
            return _problem(
                401,
                "unauthorized",
                "Feed ticket required",
                "open the dashboard as an operator: its page carries a ticket for the feed",
            )
        if self.per_client[client] >= s.stream_max_per_client:
            response = _problem(
                429,
                "too-many-streams",
                "Too many streams",
                f"at most {s.stream_max_per_client} open event streams per client "
                "(STREAM_MAX_PER_CLIENT); close one first",
            )
            response.headers["Retry-After"] = str(max(1, RECONNECT_MS // 1000))
            return response
        if self.open_streams >= s.stream_max_connections:
            response = _problem(
                503,
                "stream-capacity",
                "Stream capacity reached",
                f"this server holds {s.stream_max_connections} streams "
                "(STREAM_MAX_CONNECTIONS); retry shortly",
            )
            response.headers["Retry-After"] = str(max(1, RECONNECT_MS // 1000))
            return response
        self.per_client[client] += 1
        self.open_streams += 1
        try:
            return await self._serve(request)
        finally:
            self.open_streams -= 1
            self.per_client[client] -= 1
            if self.per_client[client] <= 0:
                del self.per_client[client]

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        s = self.settings
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
                "X-Content-Type-Options": "nosniff",
                **self._cors(request),
            }
        )
        # The connection ends with the stream: the browser opens a new one to reconnect.
        response.force_close()
        await response.prepare(request)
        hub = self.hub
        if hub is None or not hub.subscribed:
            await response.write(DOWN)
            return response
        client = Client()
        hub.clients.add(client)
        try:
            await response.write(_frame(keys.ORDER_EVENTS_CHANNEL, "subscribed", RECONNECT_MS))
            deadline = time.monotonic() + s.stream_max_seconds
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    # Recycle; the browser reconnects at once (a fresh stream).
                    await response.write(_frame("stream lifetime reached", "bye", 100))
                    break
                if not client.frames and client.last is None:
                    try:
                        await asyncio.wait_for(
                            client.wake.wait(), min(left, s.stream_keepalive_seconds)
                        )
                    except TimeoutError:
                        await response.write(b": keep-alive\n\n")
                        continue
                client.wake.clear()
                frames, client.frames = client.frames, []
                if frames:
                    await response.write(b"".join(frames))
                if client.last is not None:
                    await response.write(client.last)
                    break
        except ConnectionResetError:
            pass  # the client went away: nothing to tell it
        finally:
            hub.clients.discard(client)
        return response


def main(argv: list[str] | None = None) -> int:
    """Console script ``orders-stream``."""
    command_line("orders-stream", __doc__).parse_args(argv)  # only --help
    settings = load_settings("orders-stream", OrderServiceSettings.from_env)
    logs.configure(settings.base.log_format, settings.base.log_level)
    server = StreamServer(settings)
    web_server.RequestHandler = ProblemRequestHandler  # type: ignore[misc]

    def listening(_banner: str) -> None:  # aiohttp calls it once the socket is bound
        log.info(
            "orders-stream on http://%s:%d/events/stream: at most %d streams per client,"
            " %d in all",
            settings.host, settings.stream_port, settings.stream_max_per_client,
            settings.stream_max_connections,
        )  # fmt: skip

    try:
        web.run_app(
            server.app(),
            host=settings.host,
            port=settings.stream_port,
            print=listening,
            access_log=None,
            shutdown_timeout=2.0,
            handle_signals=True,
        )
    except OSError as exc:
        if exc.errno not in _CANNOT_BIND:
            raise
        # A port in use or not ours to take: one line, not asyncio's traceback.
        log.error(
            "orders-stream: cannot listen on %s:%d: %s",
            settings.host, settings.stream_port, exc.strerror or exc,
        )  # fmt: skip
        return EXIT_CANNOT_LISTEN
    return 0


if __name__ == "__main__":
    sys.exit(main())
