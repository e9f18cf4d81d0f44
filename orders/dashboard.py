"""The live dashboard of the order service (a Flask blueprint).

- ``GET /``: the page (server-rendered; ``static/dashboard.js`` does the rest: place an
  order, the live feed, the queue table, recent orders, dead letters).
- ``GET /events/stream``: a 307 redirect to the live feed's own server
  (:mod:`orders.stream`, ``orders-stream``). A stream lives for minutes; held by a
  gunicorn thread, twenty of them stopped intake, so none is served here. The page
  opens the feed there directly (its URL is in ``<body data-stream-url>``, and the
  Content-Security-Policy's ``connect-src`` names that origin). The URL carries a
  ticket (a random key in Redis, an hour long) that orders-stream checks: only an
  operator's page gets one. ``GET /api/stream-url`` hands out a fresh URL.
  Content-Security-Policy's ``connect-src`` names that origin).
- ``GET /api/stages?minutes=10``: per stage (event type) the count and the p50/p99
  latency since the order was placed, in 10 s buckets (60 s beyond 15 minutes), from the
  order service's own history (:mod:`orders.timing`).
- ``GET /api/orders/stuck?older_than=S``: orders that stopped advancing (not settled,
  no step for S seconds, ORDER_STUCK_SECONDS by default), oldest first, with their
  state, age and what they wait for (:mod:`orders.stuck`). With ``PATTERN=pubsub`` that
  is where the orders a stopped consumer missed show up.
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
import secrets
import time
from datetime import UTC, datetime
from urllib.parse import urlencode, urlsplit

import redis
from flask import Blueprint, Response, jsonify, redirect, render_template, request
from werkzeug.wrappers import Response as WerkzeugResponse

from messaging import keys, monitor
from orders import stuck, timing, validation
from orders.auth import CONTENT_SECURITY_POLICY
from orders.extensions import services
from orders.validation import Problem

log = logging.getLogger("orders-api")
dashboard = Blueprint("dashboard", __name__)

MAX_DEAD_LETTERS_SHOWN = 100

_rates = monitor.RateMeter()


STREAM_TICKET_SECONDS = 3600
"""How long a page's feed ticket opens streams (the page asks for a new one after)."""


def _ticket() -> str:
    # orders-stream cannot check the operator's cookie (it does not know the token, which
    # orders-api may have generated), so an operator's page gets a random ticket that
    # orders-stream looks up in Redis. Redis down: no ticket; the page asks again later.
    # The request path's client (guard): a Redis that hangs holds the page half a second.
    ticket = secrets.token_urlsafe(24)
    try:
        services().guard.set(keys.stream_ticket(ticket), "1", ex=STREAM_TICKET_SECONDS)
    except redis.RedisError as exc:
        log.warning("dashboard: no feed ticket, Redis unreachable: %s", exc)
        return ""
    return ticket


def stream_url() -> str:
    """This operator's feed URL (STREAM_URL, else host:STREAM_PORT) with a new ticket."""
    settings = services().settings
    if settings.stream_url:
        base = settings.stream_url
    else:
        host = urlsplit(f"//{request.host}").hostname or "localhost"
        if ":" in host:  # an IPv6 literal
            host = f"[{host}]"
        base = f"{request.scheme}://{host}:{settings.stream_port}/events/stream"
    return f"{base}?{urlencode({'ticket': _ticket()})}"


def content_security_policy(feed_url: str) -> str:
    """The page's policy: :data:`orders.auth.CONTENT_SECURITY_POLICY` plus the feed's origin."""
    parts = urlsplit(feed_url)
    if not parts.netloc:
        return CONTENT_SECURITY_POLICY
    return CONTENT_SECURITY_POLICY.replace(
        "connect-src 'self'", f"connect-src 'self' {parts.scheme}://{parts.netloc}"
    )


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
def page() -> Response:
    """The dashboard page."""
    feed = stream_url()
    response = Response(
        render_template(
            "dashboard.html",
            stream_url=feed,
            queues=monitor.QUEUES,
            channel=keys.ORDER_EVENTS_CHANNEL,
            pattern=services().settings.base.pattern,
        ),
        mimetype="text/html",
    )
    # orders.auth sets the other security headers (setdefault): this policy stays.
    response.headers["Content-Security-Policy"] = content_security_policy(feed)
    return response


# --- the event stream -----------------------------------------------------------------


@dashboard.get("/events/stream")
def event_stream() -> WerkzeugResponse:
    """A redirect to the live feed on ``orders-stream`` (it holds no thread here)."""
    return redirect(stream_url(), code=307)


@dashboard.get("/api/stream-url")
def stream_url_api() -> Response:
    """A fresh feed URL (with a new ticket), for a page whose ticket expired."""
    return jsonify({"url": stream_url()})


# --- time per stage -----------------------------------------------------------------------


@dashboard.get("/api/stages")
def stages() -> Response:
    """Throughput and p50/p99 latency per stage over the last minutes (see orders.timing)."""
    raw = request.args.get("minutes", "10")
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= 60:
        raise validation.bad_request("minutes", "must be an integer from 1 to 60")
    minutes = int(raw)
    bucket = 10 if minutes <= 15 else 60
    with services().sessions() as session:
        body = timing.stage_timings(session, datetime.now(UTC), minutes, bucket)
    return jsonify(body)


# --- stuck orders ---------------------------------------------------------------------------


@dashboard.get("/api/orders/stuck")
def stuck_orders() -> Response:
    """Orders not advancing for longer than ``older_than`` seconds (see orders.stuck)."""
    settings = services().settings
    raw = request.args.get("older_than")
    older_than = settings.stuck_seconds
    if raw is not None:
        try:
            older_than = float(raw)
        except ValueError:
            older_than = -1.0
        if not 0 <= older_than <= 86400:  # also rejects nan
            raise validation.bad_request("older_than", "must be a number of seconds, 0 to 86400")
    with services().sessions() as session:
        report = stuck.stuck_orders(session, older_than)
    return jsonify({"pattern": settings.base.pattern, **report.to_dict()})


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
