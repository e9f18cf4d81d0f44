"""The message envelope: one JSON shape for every channel and queue.

The contract lives in ``contracts/envelope.schema.json`` with golden examples beside it;
the Python and Go tests both read them. An envelope is a superset of the original Hello
message (``id``, ``timestamp``, ``message``, ``sender``, ``count``); domain events add
``type``, ``version`` and ``data``, and carry the W3C trace context (``traceparent``,
``tracestate``) of the span that built them (:mod:`messaging.tracing`).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from messaging import keys, tracing
from messaging.logs import utc_now_iso

ORDER_PLACED = "OrderPlaced"
PAYMENT_CAPTURED = "PaymentCaptured"
PAYMENT_DECLINED = "PaymentDeclined"
INVOICE_ISSUED = "InvoiceIssued"
SHIPMENT_BOOKED = "ShipmentBooked"
CUSTOMER_NOTIFIED = "CustomerNotified"

ROUTES: dict[str, tuple[str, ...]] = {
    ORDER_PLACED: (keys.PAYMENT_QUEUE, keys.EMAIL_QUEUE),
    PAYMENT_CAPTURED: (keys.INVOICE_QUEUE, keys.SHIPPING_QUEUE, keys.ORDER_UPDATES_QUEUE),
    PAYMENT_DECLINED: (keys.EMAIL_QUEUE, keys.ORDER_UPDATES_QUEUE),
    INVOICE_ISSUED: (keys.ORDER_UPDATES_QUEUE,),
    SHIPMENT_BOOKED: (keys.EMAIL_QUEUE, keys.ORDER_UPDATES_QUEUE),
    CUSTOMER_NOTIFIED: (keys.ORDER_UPDATES_QUEUE,),
}
"""The choreography: event type -> the queues it is pushed to (PATTERN queue or both).

This table is the only place that says who works on what. Payment works on OrderPlaced;
invoice and shipping on PaymentCaptured (so a declined order is never invoiced or
shipped); email on the three customer-visible steps; the order service records every
outcome from ``order-updates``."""

EVENT_TYPES = tuple(ROUTES)


def queues_for(event_type: str) -> tuple[str, ...]:
    """The queues an event type is pushed to; raises ValueError for an unknown type."""
    try:
        return ROUTES[event_type]
    except KeyError:
        raise ValueError(f"unknown event type {event_type!r}") from None


def accepted_by(queue: str) -> frozenset[str]:
    """The event types routed to ``queue`` (what its consumer must accept)."""
    return frozenset(t for t, queues in ROUTES.items() if queue in queues)


VERSION = 1

MAX_EVENT_ID_LENGTH = 36
"""The longest envelope ``id`` a queue message may carry: a UUID's 36 characters, the
width of the order history's ``event_id`` column (the consumers' is 64). Every
producer here writes UUIDs (:func:`envelope`, ``stable_event_id``)."""

MAX_ORDER_ID = 2**31 - 1
"""The largest ``data.order_id`` an event may carry: order ids are the order service's
``Integer`` keys (32 bits on PostgreSQL), and every service stores them in such a
column. A larger one is bad data (dead-lettered at once), not a database error to
retry until the attempts run out."""
"""Current version of every event's data shape."""

STANDARD = "standard"
EXPRESS = "express"
PRIORITIES = (STANDARD, EXPRESS)
"""An order's priority (``data.priority`` of OrderPlaced, and the envelope's ``priority``)."""


def is_express(event: dict[str, Any] | str | bytes) -> bool:
    """Whether an event (a dict, or its JSON) is express: envelope ``priority`` = express.

    The envelope's ``priority`` is the delivery class every queue reads (an order's
    OrderPlaced sets it, and each outcome event inherits it from the event it answers:
    :func:`inherit_priority`). A JSON text is decoded only when it mentions "express".
    """
    if isinstance(event, bytes):
        event = event.decode("utf-8", errors="replace")
    if isinstance(event, str):
        if '"express"' not in event:
            return False
        try:
            event = json.loads(event)
        except (ValueError, RecursionError):
            return False
    return isinstance(event, dict) and event.get("priority") == EXPRESS


def inherit_priority(outcomes: list[dict[str, Any]], cause: dict[str, Any]) -> None:
    """Mark outcome events express when the event they answer is (in place).

    Express work stays express on every queue it passes through: payment's
    PaymentCaptured for an express order is express on invoice, shipping and
    order-updates, and so on down the flow.
    """
    if is_express(cause):
        for event in outcomes:
            event["priority"] = EXPRESS


def envelope(
    event_type: str,
    data: dict[str, Any],
    *,
    message: str,
    sender: str,
    count: int,
    event_id: str | None = None,
    timestamp: str | None = None,
    priority: str = STANDARD,
) -> dict[str, Any]:
    """Build a domain event envelope (a new UUID and the current UTC time by default).

    ``priority`` express adds the envelope's ``priority`` field (standard leaves it out).
    Built inside a span (a request's, a consumer's), it carries that span's trace
    context (``traceparent``, ``tracestate``); outside any span it has none.
    """
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type!r}")
    if priority not in PRIORITIES:
        raise ValueError(f"unknown priority {priority!r}")
    event: dict[str, Any] = {
        "id": event_id or str(uuid.uuid4()),
        "timestamp": timestamp or utc_now_iso(),
        "message": message,
        "sender": sender,
        "count": count,
        "type": event_type,
        "version": VERSION,
    }
    if priority == EXPRESS:
        event["priority"] = EXPRESS
    event.update(tracing.envelope_fields(data.get("order_id")))
    event["data"] = data
    return event


def dumps(event: dict[str, Any]) -> str:
    """Serialize compactly (the wire form on channels and queues)."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False)
