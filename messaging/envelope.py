"""The message envelope: one JSON shape for every channel and queue.

The contract lives in ``contracts/envelope.schema.json`` with golden examples beside it;
the Python and Go tests both read them. An envelope is a superset of the original Hello
message (``id``, ``timestamp``, ``message``, ``sender``, ``count``); domain events add
``type``, ``version`` and ``data``.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from messaging.logs import utc_now_iso

ORDER_PLACED = "OrderPlaced"
PAYMENT_CAPTURED = "PaymentCaptured"
PAYMENT_DECLINED = "PaymentDeclined"
INVOICE_ISSUED = "InvoiceIssued"
CONFIRMATION_EMAIL_SENT = "ConfirmationEmailSent"
EVENT_TYPES = (
    ORDER_PLACED,
    PAYMENT_CAPTURED,
    PAYMENT_DECLINED,
    INVOICE_ISSUED,
    CONFIRMATION_EMAIL_SENT,
)
VERSION = 1
"""Current version of every event's data shape."""


def envelope(
    event_type: str,
    data: dict[str, Any],
    *,
    message: str,
    sender: str,
    count: int,
    event_id: str | None = None,
    timestamp: str | None = None,
) -> dict[str, Any]:
    """Build a domain event envelope (a new UUID and the current UTC time by default)."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type!r}")
    return {
        "id": event_id or str(uuid.uuid4()),
        "timestamp": timestamp or utc_now_iso(),
        "message": message,
        "sender": sender,
        "count": count,
        "type": event_type,
        "version": VERSION,
        "data": data,
    }


def dumps(event: dict[str, Any]) -> str:
    """Serialize compactly (the wire form on channels and queues)."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False)
