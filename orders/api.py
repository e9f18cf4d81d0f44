"""The HTTP API of the order service (a Flask blueprint).

``POST /orders``, ``GET /orders``, ``GET /orders/<id>``, ``GET /orders/<id>/invoice``,
``GET /healthz``, ``GET /readyz``, ``GET /openapi.json``. The OpenAPI document
(:mod:`orders.openapi`) describes exactly these.
"""

from __future__ import annotations

import logging

from flask import Blueprint, Response, current_app, jsonify, request
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from messaging import faults, tracing
from orders import validation
from orders.auth import is_operator, mask_email
from orders.extensions import app_limiter, problem_response, services, too_many
from orders.invoice import invoice_number, render_invoice
from orders.openapi import openapi_document
from orders.outbox import FastPublisher
from orders.ratelimit import RateLimiter
from orders.service import list_orders, load_order, order_to_dict, place_order
from orders.validation import Problem

log = logging.getLogger("orders-api")
api = Blueprint("orders", __name__)

MAX_ID = validation.MAX_ORDER_ID
"""Larger ids cannot exist (and PostgreSQL's INTEGER cannot even bind them)."""

RATE_LIMITER = "orders.ratelimit"
"""Key of the app's :class:`~orders.ratelimit.RateLimiter` in ``app.extensions``."""

UNLIMITED_ENDPOINTS = frozenset({"orders.healthz", "orders.readyz"})
"""Probes are never rate limited (a load balancer polls them from one address)."""


PUBLISHER = "orders.publisher"
"""Key of the app's :class:`~orders.outbox.FastPublisher` in ``app.extensions``."""


def fast_publisher() -> FastPublisher:
    """The app's background publisher of committed events (made on first use)."""
    found = current_app.extensions.get(PUBLISHER)
    if found is None:
        svc = services()
        found = current_app.extensions.setdefault(
            PUBLISHER,
            FastPublisher(svc.engine, svc.publisher, svc.settings.relay_claim_seconds / 2),
        )
    return found  # type: ignore[no-any-return]


def _limiter() -> RateLimiter:
    return app_limiter(RATE_LIMITER, lambda settings: settings.rate_limit_per_minute)


@api.before_request
def rate_limit() -> Response | None:
    """429 problem JSON with Retry-After once a client IP has used its tokens."""
    if request.endpoint in UNLIMITED_ENDPOINTS:
        return None
    limiter = _limiter()
    decision = limiter.check(request.remote_addr)
    if decision.allowed:
        return None
    return too_many(
        "rate-limited",
        "Too many requests",
        f"more than {limiter.per_minute} requests a minute from {request.remote_addr}; "
        f"retry after {decision.retry_after} s",
        decision.retry_after,
    )


def _not_found(order_id: int) -> Problem:
    return Problem(404, "not-found", "Order not found", f"there is no order {order_id}")


def _is_json(mimetype: str) -> bool:
    return mimetype == "application/json" or (
        mimetype.startswith("application/") and mimetype.endswith("+json")
    )


_POST_ORDERS_SPAN = {"http.request.method": "POST", "http.route": "/orders"}


@api.post("/orders")
def create_order() -> Response:
    """POST /orders in a server span: the OrderPlaced event carries its trace context."""
    with tracing.server_span("POST /orders", request.headers, _POST_ORDERS_SPAN) as span:
        try:
            response = _create_order()
        except Problem as problem:  # a client's error: not the span's (OpenTelemetry HTTP)
            span.set_attribute("http.response.status_code", problem.status)
            raise
        except Exception as exc:  # the app's error handlers answer it (a 5xx problem)
            span.set_attribute("error.type", type(exc).__name__)
            tracing.set_error(span, type(exc).__name__)
            raise
        span.set_attribute("http.response.status_code", response.status_code)
        return response


def _create_order() -> Response:
    """Validate, store order + lines + OrderPlaced outbox row, answer 201/200.

    The event is published right after, by the worker's background publisher.
    """
    if not _is_json(request.mimetype):
        raise Problem(
            415,
            "unsupported-media-type",
            "Unsupported media type",
            f"send the order as application/json, not {request.mimetype or 'no content type'}",
        )
    svc = services()
    key = validation.idempotency_key(request.headers.get("Idempotency-Key"))
    body = validation.parse_json(request.get_data(cache=False))
    order_request = validation.validate_order(body, svc.settings.max_lines)
    result = place_order(
        svc.engine,
        order_request,
        validation.request_hash(body),
        key,
        svc.settings.relay_claim_seconds,
    )
    if result.event is not None:
        faults.hit("api.after_commit")
        assert result.outbox_id is not None and result.payload is not None
        fast_publisher().submit(result.outbox_id, result.event["type"], result.payload)
    if result.body is not None:
        response = jsonify(result.body)
    else:
        with svc.sessions() as session:
            order = load_order(session, result.order_id)
            assert order is not None  # committed before; orders are never deleted
            response = jsonify(order_to_dict(order))
    response.status_code = 201 if result.created else 200
    response.headers["Location"] = f"/orders/{result.order_id}"
    return response


@api.get("/orders")
def get_orders() -> Response:
    """A page of orders, newest first; ``next_cursor`` is null on the last page."""
    limit = validation.page_limit(request.args.get("limit"))
    cursor = validation.page_cursor(request.args.get("cursor"))
    with services().sessions() as session:
        orders = list_orders(session, limit + 1, cursor)
        items = [order_to_dict(order) for order in orders[:limit]]
    next_cursor = str(items[-1]["id"]) if len(orders) > limit else None
    return jsonify({"items": items, "next_cursor": next_cursor})


@api.get("/orders/<int:order_id>")
def get_order(order_id: int) -> Response:
    """One order with its status and history."""
    with services().sessions() as session:
        order = load_order(session, order_id) if order_id <= MAX_ID else None
        if order is None:
            raise _not_found(order_id)
        body = order_to_dict(order)
    if not is_operator():  # ids are sequential: anyone could walk them (docs/security.md)
        body["customer_email"] = mask_email(body["customer_email"])
    return jsonify(body)


@api.get("/orders/<int:order_id>/invoice")
def get_invoice(order_id: int) -> Response:
    """The HTML invoice, once an InvoiceIssued event is recorded for the order."""
    with services().sessions() as session:
        order = load_order(session, order_id) if order_id <= MAX_ID else None
        if order is None:
            raise _not_found(order_id)
        number = invoice_number(order)
        if number is None:
            raise Problem(
                404, "not-found", "Invoice not found", f"order {order_id} has no invoice yet"
            )
        shown = order.customer_email if is_operator() else mask_email(order.customer_email)
        html = render_invoice(order, number, customer_email=shown)
    return Response(html, mimetype="text/html")


@api.get("/healthz")
def healthz() -> Response:
    """Liveness: the process answers."""
    return jsonify({"status": "ok"})


@api.get("/readyz")
def readyz() -> Response:
    """Readiness: 200 when the database and Redis both answer, else 503 naming what is down."""
    svc = services()
    checks = {"database": "ok", "redis": "ok"}
    try:
        with svc.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        log.warning("readyz: database down: %s", exc)
        checks["database"] = "down"
    try:
        svc.guard.ping()  # within GUARD_TIMEOUT_SECONDS: a probe must answer promptly
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        log.warning("readyz: redis down: %s", exc)
        checks["redis"] = "down"
    down = [name for name, state in checks.items() if state != "ok"]
    if down:
        return problem_response(
            Problem(
                503,
                "not-ready",
                "Service not ready",
                f"{' and '.join(down)} unreachable",
                extra={"checks": checks},
            )
        )
    return jsonify({"status": "ready", "checks": checks})


@api.get("/openapi.json")
def openapi() -> Response:
    """The OpenAPI 3.1 description of this API."""
    return jsonify(openapi_document(services().settings))
