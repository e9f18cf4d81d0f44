"""The live dashboard of the order service (a Flask blueprint).

- ``GET /``: the page (server-rendered; ``static/dashboard.js`` does the rest: place an
  order, the live feed, the queue table, recent orders, dead letters).
- ``GET /events/stream``: a 307 redirect to the live feed's own server
  (:mod:`orders.stream`, ``orders-stream``). A stream lives for minutes; held by a
  gunicorn thread, twenty of them stopped intake, so none is served here. The page
  opens the feed there directly (its URL is in ``<body data-stream-url>``, and the
  Content-Security-Policy's ``connect-src`` names that origin).
- ``GET /api/queues``: every queue's figures (see :mod:`messaging.monitor`) plus processed
  per second since this worker's previous answer.
- ``GET /api/queues/<queue>/dead-letters``, ``POST .../dead-letters/<id>/requeue`` and
  ``POST .../dead-letters/<id>/discard``. The POSTs take ``application/json`` only, so
  a cross-site form cannot trigger them (a JSON request from another origin needs a
  CORS preflight, which this service never grants).

Every dashboard response carries a Content-Security-Policy without inline script,
``X-Content-Type-Options: nosniff`` and a Referrer-Policy.
"""

from __future__ import annotations

import logging
import time
from urllib.parse import urlsplit

import redis
from flask import Blueprint, Response, g, jsonify, redirect, render_template, request
from werkzeug.wrappers import Response as WerkzeugResponse

from messaging import keys, monitor
from orders.extensions import services
from orders.validation import Problem

log = logging.getLogger("orders-api")
dashboard = Blueprint("dashboard", __name__)

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
"""The policy of every dashboard response; the page's adds the feed's origin to connect-src."""
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
MAX_DEAD_LETTERS_SHOWN = 100

_rates = monitor.RateMeter()


def stream_url() -> str:
    """Where this request's page opens the live feed (STREAM_URL, else host:STREAM_PORT)."""
    settings = services().settings
    if settings.stream_url:
        return settings.stream_url
    host = urlsplit(f"//{request.host}").hostname or "localhost"
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    return f"{request.scheme}://{host}:{settings.stream_port}/events/stream"


def content_security_policy(feed_url: str) -> str:
    """The page's policy: :data:`CONTENT_SECURITY_POLICY` plus the feed's origin."""
    parts = urlsplit(feed_url)
    if not parts.scheme:
        return CONTENT_SECURITY_POLICY
    return CONTENT_SECURITY_POLICY.replace(
        "connect-src 'self'", f"connect-src 'self' {parts.scheme}://{parts.netloc}"
    )


def monitor_redis() -> redis.Redis:
    """The current app's monitoring Redis client (bytes: dead letters may be garbage)."""
    return services().monitor


@dashboard.after_app_request
def _security_headers(response: Response) -> Response:
    endpoint = request.endpoint or ""
    if endpoint == "static" or endpoint.startswith("dashboard."):
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if "content_security_policy" in g:
            response.headers["Content-Security-Policy"] = g.content_security_policy
    return response


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
    feed = stream_url()
    g.content_security_policy = content_security_policy(feed)
    return render_template(
        "dashboard.html",
        stream_url=feed,
        queues=monitor.QUEUES,
        channel=keys.ORDER_EVENTS_CHANNEL,
        pattern=services().settings.base.pattern,
    )


# --- the event stream -----------------------------------------------------------------


@dashboard.get("/events/stream")
def event_stream() -> WerkzeugResponse:
    """A redirect to the live feed on ``orders-stream`` (it holds no thread here)."""
    return redirect(stream_url(), code=307)


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
