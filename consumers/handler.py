"""What every consumer handler shares: the protocol, OrderPlaced checks, outcome events."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

from consumers.queue import PermanentError
from orders import events

# fullmatch, ASCII: "^...$" would let a final newline through, and \d any Unicode digit.
_MONEY = re.compile(r"-?[0-9]{1,12}\.[0-9]{2}")
_CURRENCY = re.compile(r"[A-Z]{3}")


class Handler(Protocol):
    """One consumer's work. ``handle`` must be idempotent by event id."""

    queue: str
    """The queue it drains."""
    accepts: frozenset[str]
    """Event types it handles; any other type is a malformed message on its queue."""

    def handle(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """Do the work once and return the outcome events to emit (the stored ones on
        a duplicate). Raise RetryableError/PermanentError (or anything: retried)."""


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
    order_id = data.get("order_id")
    if not isinstance(order_id, int) or isinstance(order_id, bool) or order_id < 1:
        raise PermanentError(f"invalid OrderPlaced data: order_id {order_id!r}")
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


def outcome(
    event_type: str, data: dict[str, Any], *, order_id: int, sender: str, message: str
) -> dict[str, Any]:
    """An outcome event envelope (new id, now), counted by order id."""
    return events.envelope(event_type, data, message=message, sender=sender, count=order_id)
