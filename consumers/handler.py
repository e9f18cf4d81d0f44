"""What the consumer services share beyond the messaging core: reading OrderPlaced.

The handler protocol and outcome events are :mod:`messaging.handler`'s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

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
