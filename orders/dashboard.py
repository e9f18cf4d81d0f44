"""The live dashboard of the order service (a Flask blueprint).

- ``GET /``: the page (server-rendered; ``static/dashboard.js`` does the rest: place an
  order, the live feed, the queue table, recent orders, dead letters).
- ``GET /events/stream``: Server-Sent Events. Each connection SUBSCRIBEs to
  :data:`~messaging.keys.ORDER_EVENTS_CHANNEL` and forwards every message as it comes.
  Pub/sub is live only: what was published before the page opened is not replayed.
  A stream holds a gunicorn thread, so it sends a keep-alive comment every
  ``STREAM_KEEPALIVE_SECONDS`` and ends after ``STREAM_MAX_SECONDS`` (the browser's
  EventSource reconnects by itself). On a Redis error it ends at once, telling the
  browser when to reconnect (``retry:``); it never answers an error status, which would
  make EventSource give up.
- ``GET /api/queues``: every queue's figures (see :mod:`messaging.monitor`) plus processed
  per second since this worker's previous answer.
- ``GET /api/queues/<queue>/dead-letters``, ``POST .../dead-letters/<id>/requeue`` and
  ``POST .../dead-letters/<id>/discard``. The POSTs take ``application/json`` only, so
  a cross-site form cannot trigger them (a JSON request from another origin needs a
  CORS preflight, which this service never grants).

Every endpoint here is operator surface: :mod:`orders.auth` lets only requests with
the operator credential through, and sets the security headers (a CSP without inline
script, nosniff, Referrer-Policy, frame-ancestors) on every response.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import redis
from flask import Blueprint, Response, jsonify, render_template, request

from messaging import keys, monitor
from orders.extensions import services
from orders.validation import Problem

log = logging.getLogger("orders-api")
dashboard = Blueprint("dashboard", __name__)

RECONNECT_MS = 2000
"""What ``retry:`` tells the browser: milliseconds before it reconnects the stream."""
POLL_SECONDS = 1.0
"""How long one wait for a pub/sub message lasts (the stop checks run in between)."""
MAX_DEAD_LETTERS_SHOWN = 100

_stopping = threading.Event()
"""Set when this worker process shuts down: open streams end within POLL_SECONDS."""

_rates = monitor.RateMeter()


def stop_streams() -> None:
    """End every open event stream of this process (called on worker shutdown)."""
    _stopping.set()


def monitor_redis() -> redis.Redis:
    """The current app's monitoring Redis client (bytes: dead letters may be garbage)."""
    return services().monitor


def _redis_down(exc: Exception) -> Problem:
    log.warning("dashboard: Redis unreachable: %s", exc)
    return Problem(503, "redis-unavailable", "Redis unavailable", "Redis did not answer")


def _queue(name: str) -> str:
    try:
        return monitor.check_queue(name)
    except monitor.UnknownQueue as exc:
        raise Problem(404, "not-found", "Queue not found", str(exc)) from None


def _require_json() -> None:
    if request.mimetype != "application/json":
        raise Problem(
            415,
            "unsupported-media-type",
            "Unsupported media type",
            "send application/json (an empty object will do)",
        )


@dashboard.get("/")
def page() -> str:
    """The dashboard page."""
    return render_template(
        "dashboard.html",
        queues=monitor.QUEUES,
        channel=keys.ORDER_EVENTS_CHANNEL,
        pattern=services().settings.base.pattern,
    )


# --- the event stream -----------------------------------------------------------------


def sse_event(data: str, event: str | None = None) -> str:
    """One SSE event; every line of ``data`` becomes its own ``data:`` field."""
    head = f"event: {event}\n" if event else ""
    lines = data.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return head + "".join(f"data: {line}\n" for line in lines) + "\n"


def _stream(client: redis.Redis, max_seconds: float, keepalive: float) -> Iterator[str]:
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        try:
            pubsub.subscribe(keys.ORDER_EVENTS_CHANNEL)
        except redis.RedisError as exc:
            log.warning("dashboard stream: cannot subscribe: %s", exc)
            yield f"retry: {RECONNECT_MS}\n" + sse_event("redis unavailable", "down")
            return
        yield f"retry: {RECONNECT_MS}\n" + sse_event(keys.ORDER_EVENTS_CHANNEL, "subscribed")
        started = last_sent = time.monotonic()
        while not _stopping.is_set():
            now = time.monotonic()
            if now - started >= max_seconds:
                # Recycle the thread; the browser reconnects at once (new subscription).
                yield "retry: 100\n" + sse_event("stream lifetime reached", "bye")
                return
            if now - last_sent >= keepalive:
                yield ": keep-alive\n\n"
                last_sent = now
            try:
                message = pubsub.get_message(timeout=min(POLL_SECONDS, keepalive))
            except redis.RedisError as exc:
                log.warning("dashboard stream: lost Redis: %s", exc)
                yield f"retry: {RECONNECT_MS}\n" + sse_event("redis unavailable", "down")
                return
            if message and message.get("type") == "message":
                raw = message["data"]
                text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
                yield sse_event(text)
                last_sent = time.monotonic()
    finally:
        try:
            pubsub.close()
        except redis.RedisError:
            pass


@dashboard.get("/events/stream")
def event_stream() -> Response:
    """Server-Sent Events: the order channel, live (see the module docstring)."""
    settings = services().settings
    body = _stream(monitor_redis(), settings.stream_max_seconds, settings.stream_keepalive_seconds)
    return Response(
        body,
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


# --- queues and dead letters -------------------------------------------------------------


@dashboard.get("/api/queues")
def queues() -> Response:
    """Every queue's figures and its processed/s since this worker's previous answer."""
    try:
        figures = monitor.all_figures(monitor_redis())
    except redis.RedisError as exc:
        raise _redis_down(exc) from None
    now = time.monotonic()
    items = []
    for f in figures:
        item = f.to_dict()
        item["processed_per_second"] = _rates.rate(f.name, f.processed, now)
        items.append(item)
    return jsonify({"time": time.time(), "queues": items})


@dashboard.get("/api/queues/<queue>/dead-letters")
def dead_letters(queue: str) -> Response:
    """The oldest dead letters of a queue (up to 100)."""
    name = _queue(queue)
    try:
        letters = monitor.dead_letters(monitor_redis(), name, MAX_DEAD_LETTERS_SHOWN)
    except redis.RedisError as exc:
        raise _redis_down(exc) from None
    return jsonify(
        {"queue": name, "items": [monitor.letter_to_dict(x, i) for i, x in enumerate(letters)]}
    )


def _settle_letter(queue: str, letter_id: str, action: str) -> Response:
    _require_json()
    name = _queue(queue)
    act = monitor.requeue_letter if action == "requeue" else monitor.discard_letter
    try:
        letter = act(monitor_redis(), name, letter_id)
    except monitor.LetterNotFound as exc:
        raise Problem(404, "not-found", "Dead letter not found", str(exc)) from None
    except redis.RedisError as exc:
        raise _redis_down(exc) from None
    log.info("dashboard: %s dead letter %s of %s", action, letter_id, name)
    return jsonify({"queue": name, "id": monitor.letter_id(letter.entry), "action": action})


@dashboard.post("/api/queues/<queue>/dead-letters/<letter_id>/requeue")
def requeue(queue: str, letter_id: str) -> Response:
    """Move one dead letter back to the queue (attempts reset)."""
    return _settle_letter(queue, letter_id, "requeue")


@dashboard.post("/api/queues/<queue>/dead-letters/<letter_id>/discard")
def discard(queue: str, letter_id: str) -> Response:
    """Delete one dead letter."""
    return _settle_letter(queue, letter_id, "discard")
