"""Placing an order: one transaction for the order, its lines and its OrderPlaced event.

Idempotency: an ``Idempotency-Key`` is stored on the order (unique) with the SHA-256 of
the canonical request body. The same key with the same body returns the stored order
(``created`` False, no second row, no second event); with another body it is a 422
Problem. Two concurrent requests with one key race on the unique constraint: the loser
rolls back and returns the winner's order.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from messaging import envelope
from orders import lifecycle
from orders.models import Order, OrderLine, Outbox, utc_now
from orders.money import format_money, line_total, order_total
from orders.validation import OrderRequest, Problem

log = logging.getLogger(__name__)

SENDER = "orders-api"


@dataclass(frozen=True)
class PlaceResult:
    """What :func:`place_order` did: the order's id, and the event if it is new."""

    order_id: int
    created: bool
    event: dict[str, Any] | None
    body: dict[str, Any] | None = None
    """The new order's API representation (None when an existing order is returned)."""


def _rfc3339(value: Any) -> str:
    return str(value.isoformat(timespec="microseconds"))


def order_placed_event(order: Order) -> dict[str, Any]:
    """The OrderPlaced envelope of an order (``data`` is the schema's OrderPlacedV1)."""
    items = sum(line.quantity for line in order.lines)
    total = format_money(order.total)
    return envelope.envelope(
        envelope.ORDER_PLACED,
        {
            "order_id": order.id,
            "customer_email": order.customer_email,
            "currency": order.currency,
            "lines": [
                {
                    "sku": line.sku,
                    "quantity": line.quantity,
                    "unit_price": format_money(line.unit_price),
                    "line_total": format_money(line.line_total),
                }
                for line in order.lines
            ],
            "total": total,
        },
        message=(
            f"Order {order.id} placed by {order.customer_email}: "
            f"{items} {'item' if items == 1 else 'items'}, {total} {order.currency}"
        ),
        sender=SENDER,
        count=order.id,
        timestamp=_rfc3339(order.created_at),
    )


def _existing(session: Session, key: str, body_hash: str) -> int | None:
    found = session.execute(
        select(Order.id, Order.request_hash).where(Order.idempotency_key == key)
    ).first()
    if found is None:
        return None
    if found.request_hash != body_hash:
        raise Problem(
            422,
            "idempotency-key-reused",
            "Idempotency-Key reused with a different body",
            f"the Idempotency-Key {key!r} was first used with another request body",
            [{"field": "Idempotency-Key", "message": "reused with a different body"}],
        )
    return int(found.id)


def place_order(
    sessions: sessionmaker[Session],
    request: OrderRequest,
    body_hash: str,
    key: str | None = None,
    claim_seconds: float = 15.0,
) -> PlaceResult:
    """Store an order, its lines and its OrderPlaced outbox row in one transaction.

    The outbox row is created already claimed for ``claim_seconds``: the caller
    publishes it right after commit (the fast path) and the relay leaves it alone until
    the claim expires, so the event is not sent twice by a relay racing the request.

    Raises:
        Problem: 422 when ``key`` was used before with another body.
    """
    if key is not None:
        with sessions() as session:
            existing = _existing(session, key, body_hash)
        if existing is not None:
            return PlaceResult(existing, False, None)
    now = utc_now()
    try:
        with sessions.begin() as session:
            order = Order(
                customer_email=request.customer_email,
                currency=request.currency,
                status="placed",
                created_at=now,
                idempotency_key=key,
                request_hash=body_hash,
                lines=[
                    OrderLine(
                        position=position,
                        sku=item.sku,
                        quantity=item.quantity,
                        unit_price=item.unit_price,
                        line_total=line_total(item.unit_price, item.quantity),
                    )
                    for position, item in enumerate(request.items)
                ],
            )
            order.total = order_total(line.line_total for line in order.lines)
            session.add(order)
            session.flush()  # assigns order.id, which the event carries
            event = order_placed_event(order)
            session.add(
                Outbox(
                    event_id=event["id"],
                    type=event["type"],
                    payload=envelope.dumps(event),
                    created_at=now,
                    claimed_until=now + timedelta(seconds=claim_seconds),
                    attempts=0,
                )
            )
            order_id = order.id
            body = order_to_dict(order, history=[])
    except IntegrityError:
        if key is None:
            raise
        # A concurrent request with the same key committed first: answer with its order.
        with sessions() as session:
            winner = _existing(session, key, body_hash)
        if winner is None:
            raise
        log.info("Idempotency-Key race lost to order %d", winner)
        return PlaceResult(winner, False, None)
    return PlaceResult(order_id, True, event, body)


def load_order(session: Session, order_id: int) -> Order | None:
    """An order with its lines and history, or None."""
    return session.execute(
        select(Order)
        .where(Order.id == order_id)
        .options(selectinload(Order.lines), selectinload(Order.history))
    ).scalar_one_or_none()


def list_orders(session: Session, limit: int, before_id: int | None) -> list[Order]:
    """Up to ``limit`` orders, newest first, with an id below ``before_id`` if given."""
    query = select(Order).options(selectinload(Order.lines), selectinload(Order.history))
    if before_id is not None:
        query = query.where(Order.id < before_id)
    return list(session.execute(query.order_by(Order.id.desc()).limit(limit)).scalars())


def order_timeline(order: Order, history: list[Any]) -> list[dict[str, Any]]:
    """OrderPlaced, then each recorded outcome in recording order, through the state machine."""
    recorded = sorted(history, key=lambda entry: entry.id)
    entries: list[dict[str, Any]] = [
        {
            "type": envelope.ORDER_PLACED,
            "at": _rfc3339(order.created_at),
            "status": lifecycle.PLACED,
            "effect": "advanced",
        }
    ]
    steps = lifecycle.timeline(entry.type for entry in recorded)
    for entry, line in zip(recorded, steps, strict=True):
        entries.append(
            {
                "type": entry.type,
                "event_id": entry.event_id,
                "at": _rfc3339(entry.occurred_at),
                "status": line.status,
                "effect": line.effect,
            }
        )
    return entries


def order_to_dict(order: Order, history: list[Any] | None = None) -> dict[str, Any]:
    """The API representation of an order (``history`` given: skip loading it)."""
    history = order.history if history is None else history
    return {
        "id": order.id,
        "status": order.status,
        "customer_email": order.customer_email,
        "currency": order.currency,
        "lines": [
            {
                "sku": line.sku,
                "quantity": line.quantity,
                "unit_price": format_money(line.unit_price),
                "line_total": format_money(line.line_total),
            }
            for line in order.lines
        ],
        "total": format_money(order.total),
        "created_at": _rfc3339(order.created_at),
        "history": [
            {
                "event_id": entry.event_id,
                "type": entry.type,
                "occurred_at": _rfc3339(entry.occurred_at),
                "data": json.loads(entry.data),
            }
            for entry in history
        ],
        "timeline": order_timeline(order, history),
    }
