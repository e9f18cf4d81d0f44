"""What the consumer services share beyond the messaging core: reading event data.

The handler protocol and outcome events are :mod:`messaging.handler`'s.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

from messaging import envelope
from messaging.queue import PermanentError

# fullmatch, ASCII: "^...$" would let a final newline through, and \d any Unicode digit.
_MONEY = re.compile(r"-?[0-9]{1,12}\.[0-9]{2}")
_CURRENCY = re.compile(r"[A-Z]{3}")


@dataclass(frozen=True)
class Order:
    """The fields of an OrderPlaced event the consumers use."""

    order_id: int
    customer_email: str
    currency: str
    total: str
    lines: list[dict[str, Any]]


def order_of(event: dict[str, Any]) -> Order:
    """Check an OrderPlaced event's data; raise PermanentError naming what is wrong."""
    data = event["data"]
    order_id = order_id_of(event)
    email = data.get("customer_email")
    if not isinstance(email, str) or "@" not in email:
        raise PermanentError(f"invalid OrderPlaced data: customer_email {email!r}")
    currency = data.get("currency")
    if not isinstance(currency, str) or not _CURRENCY.fullmatch(currency):
        raise PermanentError(f"invalid OrderPlaced data: currency {currency!r}")
    total = data.get("total")
    if not isinstance(total, str) or not _MONEY.fullmatch(total):
        raise PermanentError(f"invalid OrderPlaced data: total {total!r}")
    lines = data.get("lines")
    if not isinstance(lines, list) or not lines or not all(isinstance(x, dict) for x in lines):
        raise PermanentError("invalid OrderPlaced data: lines must be a non-empty list")
    return Order(order_id, email, currency, total, lines)


def order_id_of(event: dict[str, Any]) -> int:
    """The ``data.order_id`` of any order event; raise PermanentError when it is invalid."""
    order_id = event["data"].get("order_id")
    if (
        not isinstance(order_id, int)
        or isinstance(order_id, bool)
        or not 1 <= order_id <= envelope.MAX_ORDER_ID
    ):
        raise PermanentError(f"invalid {event.get('type')} data: order_id {order_id!r}"[:300])
    return order_id


def text_field(event: dict[str, Any], name: str, pattern: re.Pattern[str] | None = None) -> str:
    """A required string field of ``data``; raise PermanentError naming it when invalid."""
    value = event["data"].get(name)
    if not isinstance(value, str) or not value or (pattern and not pattern.match(value)):
        raise PermanentError(f"invalid {event.get('type')} data: {name} {value!r}")
    return value


def money_field(event: dict[str, Any], name: str) -> str:
    """A required decimal-string money field of ``data`` (``"12.50"``)."""
    return text_field(event, name, _MONEY)


def currency_field(event: dict[str, Any]) -> str:
    """The required ISO 4217 ``data.currency``."""
    return text_field(event, "currency", _CURRENCY)


_OUTCOME_NAMESPACE = uuid.UUID("6f1c2a52-93a4-4c57-9a3b-0d2f4d1e7c11")


def stable_event_id(event_type: str, order_id: int, step: str = "") -> str:
    """A UUID fixed by (type, order, step): one order's effect always reports one event id.

    A service whose effect is unique per order (an invoice, a shipment, an email per
    step) reports it under this id, so any re-emission - a redelivered job, a second
    PaymentCaptured for the same order - is the same event to everyone downstream.
    """
    return str(uuid.uuid5(_OUTCOME_NAMESPACE, f"{event_type}:{order_id}:{step}"))
