"""The OpenAPI 3.1 document of the order API, written by hand.

Tests keep it honest: every route of the app is documented (and nothing more), real
responses validate against the schemas below, and the money and currency patterns are
the message contract's (``contracts/envelope.schema.json``).
"""

from __future__ import annotations

from typing import Any

from messaging import envelope, monitor
from orders import lifecycle
from orders.config import OrderServiceSettings
from orders.money import MAX_UNIT_PRICE
from orders.validation import (
    CURRENCIES,
    MAX_EMAIL_LENGTH,
    MAX_QUANTITY,
    PROBLEM_CONTENT_TYPE,
)

MONEY_PATTERN = r"^-?\d{1,12}\.\d{2}$"
"""Money as the service writes it: the contract's ``$defs/money``."""
CURRENCY_PATTERN = r"^[A-Z]{3}$"
"""The contract's ``$defs/currency``."""
PRICE_INPUT_PATTERN = r"^[0-9]+(\.[0-9]{1,2})?$"
"""Unit prices as the service accepts them: up to two decimals."""


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _problem(description: str, schema: str = "Problem") -> dict[str, Any]:
    return {"description": description, "content": {PROBLEM_CONTENT_TYPE: {"schema": _ref(schema)}}}


def _json(description: str, schema: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": _ref(schema)}},
    }
    if headers:
        response["headers"] = headers
    return response


ORDER_ID = {"name": "order_id", "in": "path", "required": True, "schema": {"type": "integer"}}


PUBLIC_OPERATIONS = frozenset(
    {
        ("/orders", "post"),
        ("/orders/{order_id}", "get"),
        ("/orders/{order_id}/invoice", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/openapi.json", "get"),
        ("/login", "get"),
        ("/login", "post"),
    }
)
"""Operations anyone may call (orders.auth.PUBLIC_ENDPOINTS); the rest need the token."""

SECURITY_SCHEMES = {
    "operatorToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "ADMIN_TOKEN (or the token orders-api generated and logged at start).",
    },
    "operatorCookie": {
        "type": "apiKey",
        "in": "cookie",
        "name": "orders_admin",
        "description": "The dashboard's session (set by /login or /?token=...).",
    },
}


def _protect(paths: dict[str, Any]) -> dict[str, Any]:
    """Mark every operation outside PUBLIC_OPERATIONS as needing the operator credential."""
    for path, operations in paths.items():
        for method, operation in operations.items():
            if (path, method) in PUBLIC_OPERATIONS:
                continue
            operation["security"] = [{"operatorToken": []}, {"operatorCookie": []}]
            operation["responses"]["401"] = _problem("No or wrong operator credential")
            operation["responses"]["429"] = _problem(
                "Too many wrong operator tokens from this client (AUTH_FAILURES_PER_MINUTE); "
                "Retry-After says when to try again"
            )
    return paths


def _login_paths() -> dict[str, Any]:
    html = {"text/html": {"schema": {"type": "string"}}}
    return {
        "/login": {
            "get": {
                "summary": "The dashboard's login form (HTML)",
                "responses": {"200": {"description": "The form", "content": html}},
            },
            "post": {
                "summary": "Log in with the operator token; sets the session cookie",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/x-www-form-urlencoded": {
                            "schema": {
                                "type": "object",
                                "required": ["token"],
                                "properties": {"token": {"type": "string"}},
                            }
                        }
                    },
                },
                "responses": {
                    "303": {"description": "Logged in: to the dashboard, with the cookie"},
                    "401": {"description": "Wrong token: the form again", "content": html},
                    "429": {
                        "description": "Too many wrong tokens from this client: the form, "
                        "with Retry-After",
                        "content": html,
                    },
                },
            },
        }
    }


def openapi_document(settings: OrderServiceSettings) -> dict[str, Any]:
    """The document, with the limits of this deployment (MAX_LINES, MAX_BODY_BYTES)."""
    location = {"Location": {"schema": {"type": "string"}, "description": "/orders/{id}"}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Orders API",
            "version": "1.0.0",
            "description": (
                "Event-driven order intake on Redis. Money is always a decimal string "
                "with two decimals. Errors are RFC 9457 problem details. Request bodies "
                f"larger than {settings.max_body_bytes} bytes are rejected with 413."
            ),
        },
        "paths": _protect(
            {
                "/orders": {
                    "post": {
                        "summary": "Place an order",
                        "parameters": [
                            {
                                "name": "Idempotency-Key",
                                "in": "header",
                                "required": False,
                                "description": (
                                    "Retry safely: the same key and body return the same order "
                                    "(200); the same key with another body is a 422."
                                ),
                                "schema": {"type": "string", "pattern": r"^[\x21-\x7e]{1,255}$"},
                            }
                        ],
                        "requestBody": {
                            "required": True,
                            "content": {"application/json": {"schema": _ref("OrderRequest")}},
                        },
                        "responses": {
                            "201": _json("Order placed", "Order", location),
                            "200": _json(
                                "Same Idempotency-Key and body: the order", "Order", location
                            ),
                            "400": _problem("Malformed JSON or bad Idempotency-Key"),
                            "413": _problem("Body too large"),
                            "415": _problem("Not application/json"),
                            "422": _problem(
                                "Invalid order, or Idempotency-Key reused", "Validation"
                            ),
                        },
                    },
                    "get": {
                        "summary": "List orders, newest first",
                        "parameters": [
                            {
                                "name": "limit",
                                "in": "query",
                                "schema": {"type": "integer", "minimum": 1, "maximum": 100},
                            },
                            {
                                "name": "cursor",
                                "in": "query",
                                "description": "next_cursor of the previous page (opaque)",
                                "schema": {"type": "string"},
                            },
                        ],
                        "responses": {
                            "200": _json("A page of orders", "OrderPage"),
                            "400": _problem("Bad limit or cursor", "Validation"),
                        },
                    },
                },
                "/orders/{order_id}": {
                    "get": {
                        "summary": "One order with its status and history",
                        "description": (
                            "Public. Without the operator credential customer_email is masked "
                            "(a***@example.com): order ids are sequential, so anyone could walk "
                            "them and collect every customer's address."
                        ),
                        "parameters": [ORDER_ID],
                        "responses": {
                            "200": _json("The order", "Order"),
                            "404": _problem("No such order"),
                        },
                    }
                },
                "/orders/{order_id}/invoice": {
                    "get": {
                        "summary": "The HTML invoice (once InvoiceIssued is recorded)",
                        "parameters": [ORDER_ID],
                        "responses": {
                            "200": {
                                "description": "The invoice",
                                "content": {"text/html": {"schema": {"type": "string"}}},
                            },
                            "404": _problem("No such order, or no invoice yet"),
                        },
                    }
                },
                "/healthz": {
                    "get": {
                        "summary": "Liveness",
                        "responses": {"200": _json("The process answers", "Health")},
                    }
                },
                "/readyz": {
                    "get": {
                        "summary": "Readiness: database and Redis reachable",
                        "responses": {
                            "200": _json("Ready", "Health"),
                            "503": _problem("Not ready: names what is down"),
                        },
                    }
                },
                **_monitoring_paths(),
                **_login_paths(),
                "/openapi.json": {
                    "get": {
                        "summary": "This document",
                        "responses": {
                            "200": {
                                "description": "OpenAPI 3.1",
                                "content": {"application/json": {"schema": {"type": "object"}}},
                            }
                        },
                    }
                },
            }
        ),
        "components": {
            "schemas": {**_schemas(settings), **_monitoring_schemas()},
            "securitySchemes": SECURITY_SCHEMES,
        },
    }


def _schemas(settings: OrderServiceSettings) -> dict[str, Any]:
    money = {"type": "string", "pattern": MONEY_PATTERN, "examples": ["25.00"]}
    line_out = {
        "type": "object",
        "required": ["sku", "quantity", "unit_price", "line_total"],
        "additionalProperties": False,
        "properties": {
            "sku": {"type": "string"},
            "quantity": {"type": "integer", "minimum": 1},
            "unit_price": money,
            "line_total": money,
        },
    }
    return {
        "LineRequest": {
            "type": "object",
            "required": ["sku", "quantity", "unit_price"],
            "additionalProperties": False,
            "properties": {
                "sku": {"type": "string", "pattern": r"^[A-Za-z0-9._-]{1,64}$"},
                "quantity": {"type": "integer", "minimum": 1, "maximum": MAX_QUANTITY},
                "unit_price": {
                    "type": "string",
                    "pattern": PRICE_INPUT_PATTERN,
                    "description": f"Above 0, at most {MAX_UNIT_PRICE}; a string, not a number.",
                    "examples": ["12.50"],
                },
            },
        },
        "OrderRequest": {
            "type": "object",
            "required": ["customer_email", "currency", "items"],
            "additionalProperties": False,
            "properties": {
                "customer_email": {
                    "type": "string",
                    "format": "email",
                    "maxLength": MAX_EMAIL_LENGTH,
                },
                "currency": {
                    "type": "string",
                    "pattern": CURRENCY_PATTERN,
                    "enum": sorted(CURRENCIES),
                },
                "items": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": settings.max_lines,
                    "description": "One line per SKU: a repeated SKU is rejected.",
                    "items": _ref("LineRequest"),
                },
                "priority": {
                    "description": (
                        "express work is taken before standard work on every queue the "
                        "order passes through (standard work still progresses)."
                    ),
                    "enum": ["standard", "express"],
                    "default": "standard",
                },
            },
        },
        "Order": {
            "type": "object",
            "required": [
                "id",
                "status",
                "priority",
                "customer_email",
                "currency",
                "lines",
                "total",
                "created_at",
                "history",
                "timeline",
            ],
            "additionalProperties": False,
            "properties": {
                "id": {"type": "integer", "minimum": 1},
                "status": {
                    "description": (
                        "placed -> paid -> invoiced|shipped -> completed (invoice AND "
                        "shipment), or placed -> cancelled (payment declined)."
                    ),
                    "enum": list(lifecycle.STATES),
                },
                "priority": {"enum": ["standard", "express"]},
                "customer_email": {"type": "string"},
                "currency": {"type": "string", "pattern": CURRENCY_PATTERN},
                "lines": {"type": "array", "minItems": 1, "items": line_out},
                "total": money,
                "created_at": {"type": "string", "format": "date-time"},
                "history": {"type": "array", "items": _ref("HistoryEntry")},
                "timeline": {
                    "description": (
                        "OrderPlaced, then every recorded outcome in the order it was "
                        "recorded, with the status it left and what it did."
                    ),
                    "type": "array",
                    "items": _ref("TimelineEntry"),
                },
            },
        },
        "TimelineEntry": {
            "type": "object",
            "required": ["type", "at", "status", "effect"],
            "additionalProperties": False,
            "properties": {
                "type": {"enum": [envelope.ORDER_PLACED, *lifecycle.OUTCOME_TYPES]},
                "event_id": {"type": "string"},
                "at": {"type": "string", "format": "date-time"},
                "status": {"enum": list(lifecycle.STATES)},
                "effect": {"enum": ["advanced", "unchanged", "conflict"]},
            },
        },
        "HistoryEntry": {
            "type": "object",
            "required": ["event_id", "type", "occurred_at", "data"],
            "additionalProperties": False,
            "properties": {
                "event_id": {"type": "string"},
                "type": {"enum": list(lifecycle.OUTCOME_TYPES)},
                "occurred_at": {"type": "string", "format": "date-time"},
                "data": {"type": "object"},
            },
        },
        "OrderPage": {
            "type": "object",
            "required": ["items", "next_cursor"],
            "additionalProperties": False,
            "properties": {
                "items": {"type": "array", "items": _ref("Order")},
                "next_cursor": {"type": ["string", "null"]},
            },
        },
        "Health": {
            "type": "object",
            "required": ["status"],
            "properties": {"status": {"type": "string"}, "checks": {"type": "object"}},
        },
        "Problem": {
            "type": "object",
            "required": ["type", "title", "status", "detail"],
            "properties": {
                "type": {"type": "string"},
                "title": {"type": "string"},
                "status": {"type": "integer"},
                "detail": {"type": "string"},
                "checks": {"type": "object"},
            },
        },
        "Validation": {
            "allOf": [_ref("Problem")],
            "properties": {
                "errors": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["field", "message"],
                        "properties": {
                            "field": {"type": "string"},
                            "message": {"type": "string"},
                        },
                    },
                }
            },
        },
    }


# --- dashboard, metrics, admin (orders/dashboard.py, orders/metrics.py) -----------------

QUEUE_NAME = {
    "name": "queue",
    "in": "path",
    "required": True,
    "schema": {"enum": list(monitor.QUEUES)},
}
LETTER_ID = {
    "name": "letter_id",
    "in": "path",
    "required": True,
    "description": "The letter's id (12 hex digits, from the list) or its index in the list",
    "schema": {"type": "string", "pattern": r"^([0-9a-f]{12}|[0-9]{1,11})$"},
}


def _settle_operation(summary: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "parameters": [QUEUE_NAME, LETTER_ID],
        "requestBody": {
            "required": True,
            "description": "application/json only (an empty object), so no form can send it",
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
        "responses": {
            "200": _json("Done", "LetterAction"),
            "404": _problem("No such queue or dead letter"),
            "415": _problem("Not application/json"),
            "503": _problem("Redis unavailable"),
        },
    }


def _monitoring_paths() -> dict[str, Any]:
    html = {"text/html": {"schema": {"type": "string"}}}
    return {
        "/": {
            "get": {
                "summary": "The live dashboard (HTML)",
                "responses": {"200": {"description": "The page", "content": html}},
            }
        },
        "/events/stream": {
            "get": {
                "summary": "Redirect to the live event feed (orders-stream)",
                "description": (
                    "Server-Sent Events are served by orders-stream, an async server of "
                    "their own (STREAM_PORT, or STREAM_URL), so a stream never holds one "
                    "of this API's threads. The feed is the order event channel, live only."
                ),
                "responses": {"307": {"description": "The feed's URL in Location"}},
            }
        },
        "/api/stages": {
            "get": {
                "summary": "Throughput and p50/p99 latency per stage over the last minutes",
                "parameters": [
                    {
                        "name": "minutes",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 60},
                    }
                ],
                "responses": {
                    "200": {"description": "Buckets, and per stage counts and percentiles"},
                    "400": {"description": "minutes out of range"},
                },
            }
        },
        "/api/orders/stuck": {
            "get": {
                "summary": "Orders not advancing for longer than older_than seconds (oldest first)",
                "parameters": [
                    {
                        "name": "older_than",
                        "in": "query",
                        "description": "Seconds without a step (default ORDER_STUCK_SECONDS)",
                        "schema": {"type": "number", "minimum": 0, "maximum": 86400},
                    }
                ],
                "responses": {
                    "200": _json("The stuck orders and their total", "StuckOrders"),
                    "400": _problem("older_than out of range or not a number"),
                },
            }
        },
        "/api/stream-url": {
            "get": {
                "summary": "A fresh live-feed URL with a new ticket (operators only)",
                "responses": {"200": {"description": "The feed's URL in url"}},
            }
        },
        "/api/queues": {
            "get": {
                "summary": "Every queue's figures",
                "responses": {
                    "200": _json("The queues", "Queues"),
                    "503": _problem("Redis unavailable"),
                },
            }
        },
        "/api/queues/{queue}/dead-letters": {
            "get": {
                "summary": "The oldest dead letters of a queue (up to 100)",
                "parameters": [QUEUE_NAME],
                "responses": {
                    "200": _json("The dead letters", "DeadLetters"),
                    "404": _problem("No such queue"),
                    "503": _problem("Redis unavailable"),
                },
            }
        },
        "/api/queues/{queue}/dead-letters/{letter_id}/requeue": {
            "post": _settle_operation("Put a dead letter back on its queue (attempts reset)")
        },
        "/api/queues/{queue}/dead-letters/{letter_id}/discard": {
            "post": _settle_operation("Delete a dead letter")
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (text exposition format)",
                "responses": {
                    "200": {
                        "description": "Metrics",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    }


LETTER_FIELDS = ["id", "index", "queue", "error", "attempts", "cause", "failed_at", "message"]


def _monitoring_schemas() -> dict[str, Any]:
    count = {"type": "integer", "minimum": 0}
    figures = [
        "pending", "in_flight", "delayed", "dead", "processed", "failed", "retried",
        "workers", "workers_alive",
    ]  # fmt: skip
    return {
        "StuckOrders": {
            "type": "object",
            "required": ["pattern", "older_than_seconds", "total", "orders"],
            "properties": {
                "pattern": {"type": "string", "enum": ["pubsub", "queue", "both"]},
                "older_than_seconds": {"type": "number", "minimum": 0},
                "total": count,
                "orders": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": [
                            "id",
                            "status",
                            "placed_at",
                            "last_step_at",
                            "age_seconds",
                            "idle_seconds",
                            "waiting_for",
                        ],  # fmt: skip
                        "additionalProperties": False,
                        "properties": {
                            "id": {"type": "integer", "minimum": 1},
                            "status": {"type": "string"},
                            "placed_at": {"type": "string"},
                            "last_step_at": {"type": "string"},
                            "age_seconds": {"type": "number", "minimum": 0},
                            "idle_seconds": {"type": "number", "minimum": 0},
                            "waiting_for": {"type": "string"},
                        },
                    },
                },
            },
        },
        "Queues": {
            "type": "object",
            "required": ["time", "queues"],
            "properties": {
                "time": {"type": "number", "description": "UNIX time of the reading"},
                "queues": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", *figures, "processed_per_second"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string"},
                            **dict.fromkeys(figures, count),
                            "processed_per_second": {
                                "type": ["number", "null"],
                                "description": "since this worker's previous answer",
                            },
                        },
                    },
                },
            },
        },
        "DeadLetters": {
            "type": "object",
            "required": ["queue", "items"],
            "properties": {
                "queue": {"type": "string"},
                "items": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": LETTER_FIELDS,
                        "additionalProperties": False,
                        "properties": {
                            "id": {"type": "string", "pattern": "^[0-9a-f]{12}$"},
                            "index": count,
                            "queue": {"type": "string"},
                            "error": {"type": "string"},
                            "attempts": count,
                            "cause": {
                                "enum": ["permanent", "attempts", "transient", ""],
                                "description": "transient: the workers revive it by themselves"
                                " (the dependency was away); empty in older letters",
                            },
                            "failed_at": {"type": "string"},
                            "message": {"type": "string"},
                        },
                    },
                },
            },
        },
        "LetterAction": {
            "type": "object",
            "required": ["queue", "id", "action"],
            "properties": {
                "queue": {"type": "string"},
                "id": {"type": "string"},
                "action": {"enum": ["requeue", "discard"]},
            },
        },
    }
