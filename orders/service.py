"""Placing an order: one transaction for the order, its lines and its OrderPlaced event.

The intake is the hot path (every POST): it runs three INSERTs compiled once by
SQLAlchemy on the driver's cursor (:class:`messaging.database.DriverInsert`), builds the
event and the response from the validated request, and never loads ORM objects.
Reads (``GET /orders``) keep the ORM, where it reads better.

Idempotency: an ``Idempotency-Key`` is stored on the order (unique) with the SHA-256 of
the canonical request body. The same key with the same body returns the stored order
(``created`` False, no second row, no second event); with another body it is a 422
Problem. The key's unique constraint decides (no look-up first): a repeated key's
insert fails, its transaction rolls back, and the stored order is returned; of two
concurrent requests with one key, the loser returns the winner's order.
"""

from __future__ import annotations

import json
import logging
import weakref
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Connection, Dialect, Engine, Table, bindparam, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from messaging import database, envelope
from messaging.database import DriverInsert, driver_transaction
from orders import lifecycle
from orders.models import STATUS_PLACED, Order, OrderLine, Outbox, utc_now
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
    outbox_id: int | None = None
    """The new event's outbox row (to mark it published after the fast path)."""
    payload: str | None = None
    """The new event as stored in the outbox (JSON text), to publish as is."""


def _rfc3339(value: Any) -> str:
    return str(value.isoformat(timespec="microseconds"))


def order_placed_event(order: Order) -> dict[str, Any]:
    """The OrderPlaced envelope of a stored order (``data`` is the schema's OrderPlacedV1)."""
    return _order_placed(
        order.id,
        order.customer_email,
        order.currency,
        [
            {
                "sku": line.sku,
                "quantity": line.quantity,
                "unit_price": format_money(line.unit_price),
                "line_total": format_money(line.line_total),
            }
            for line in order.lines
        ],
        format_money(order.total),
        _rfc3339(order.created_at),
        order.priority or envelope.STANDARD,
    )


def _order_placed(
    order_id: int,
    customer_email: str,
    currency: str,
    lines: list[dict[str, Any]],
    total: str,
    timestamp: str,
    priority: str = envelope.STANDARD,
) -> dict[str, Any]:
    items = sum(int(line["quantity"]) for line in lines)
    data: dict[str, Any] = {
        "order_id": order_id,
        "customer_email": customer_email,
        "currency": currency,
        "lines": lines,
        "total": total,
    }
    if priority == envelope.EXPRESS:  # standard: left out, as the contract's default
        data["priority"] = priority
    return envelope.envelope(
        envelope.ORDER_PLACED,
        data,
        message=(
            f"Order {order_id} placed by {customer_email}: "
            f"{items} {'item' if items == 1 else 'items'}, {total} {currency}"
        ),
        sender=SENDER,
        count=order_id,
        timestamp=timestamp,
        priority=priority,
    )


# The hot path's statements: compiled once per engine by SQLAlchemy, run on the driver's
# cursor (messaging.database.DriverInsert: SQLAlchemy's per-execution machinery cost
# four times the driver's own work; the ORM's unit of work, before, cost 60% of a POST).
_ORDERS = cast(Table, Order.__table__)
_FIND_BY_KEY = select(_ORDERS.c.id, _ORDERS.c.request_hash).where(
    _ORDERS.c.idempotency_key == bindparam("key")
)


class _Inserts:
    """The hot path's INSERTs for one engine (the outbox's per claim length)."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.orders = DriverInsert(_ORDERS, dialect, returning_id=True)
        self.lines = DriverInsert(cast(Table, OrderLine.__table__), dialect)
        self._outbox: dict[float, DriverInsert] = {}

    def outbox(self, claim_seconds: float) -> DriverInsert:
        """The outbox insert, its row born claimed until the *database's* now + claim.

        The relay compares claims with the database's clock
        (:func:`messaging.database.now_plus`); a claim written with this host's clock
        would be an hour long on a host an hour ahead (the relay leaves a failed fast
        path's row alone that long) and expired at birth on a host an hour behind
        (every relay races the fast path: duplicates).
        """
        found = self._outbox.get(claim_seconds)
        if found is None:
            found = self._outbox.setdefault(
                claim_seconds,
                DriverInsert(
                    cast(Table, Outbox.__table__),
                    self.dialect,
                    returning_id=True,
                    sql_values={
                        "claimed_until": database.now_plus(self.dialect.name, claim_seconds)
                    },
                ),
            )
        return found


_INSERTS: weakref.WeakKeyDictionary[Engine, _Inserts] = weakref.WeakKeyDictionary()


def _inserts(engine: Engine) -> _Inserts:
    found = _INSERTS.get(engine)
    if found is None:
        found = _INSERTS.setdefault(engine, _Inserts(engine.dialect))
    return found


def _existing(conn: Connection, key: str, body_hash: str) -> int | None:
    found = conn.execute(_FIND_BY_KEY, {"key": key}).first()
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
    engine: Engine,
    request: OrderRequest,
    body_hash: str,
    key: str | None = None,
    claim_seconds: float = 15.0,
) -> PlaceResult:
    """Store an order, its lines and its OrderPlaced outbox row in ONE transaction.

    The Idempotency-Key is not looked up first: almost every key is new, and the key's
    unique constraint decides anyway. A key seen before makes the order's INSERT fail;
    the transaction rolls back (nothing of it stays) and the stored order with that key
    is returned, or a 422 when it was stored for another body. Two concurrent requests
    with one key race the same way: the loser answers with the winner's order.

    The outbox row is created already claimed for ``claim_seconds`` (on the database's
    clock, which the relays compare claims with): the caller
    publishes it right after commit (the fast path) and the relay leaves it alone until
    the claim expires, so the event is not sent twice by a relay racing the request.

    Raises:
        Problem: 422 when ``key`` was used before with another body.
    """
    now = utc_now()
    timestamp = _rfc3339(now)
    priced = [
        (position, item, line_total(item.unit_price, item.quantity))
        for position, item in enumerate(request.items)
    ]
    total = order_total(amount for _, _, amount in priced)
    lines = [
        {
            "sku": item.sku,
            "quantity": item.quantity,
            "unit_price": format_money(item.unit_price),
            "line_total": format_money(amount),
        }
        for _, item, amount in priced
    ]
    inserts = _inserts(engine)
    try:
        with driver_transaction(engine) as cursor:
            order_id = inserts.orders.one(
                cursor,
                {
                    "customer_email": request.customer_email,
                    "currency": request.currency,
                    "total": total,
                    "status": STATUS_PLACED,
                    "priority": request.priority,
                    "created_at": now,
                    "idempotency_key": key,
                    "request_hash": body_hash,
                },
            )
            assert order_id is not None
            inserts.lines.many(
                cursor,
                [
                    {
                        "order_id": order_id,
                        "position": position,
                        "sku": item.sku,
                        "quantity": item.quantity,
                        "unit_price": item.unit_price,
                        "line_total": amount,
                    }
                    for position, item, amount in priced
                ],
            )
            event = _order_placed(
                order_id, request.customer_email, request.currency, lines, format_money(total),
                timestamp, request.priority,
            )  # fmt: skip
            payload = envelope.dumps(event)
            outbox_id = inserts.outbox(float(claim_seconds)).one(
                cursor,
                {
                    "event_id": event["id"],
                    "type": event["type"],
                    "payload": payload,
                    "created_at": now,
                    "attempts": 0,
                },
            )
    except IntegrityError:
        if key is None:
            raise
        # The key was used before (a retry), or a concurrent request with it committed
        # first: answer with that order (or 422 for another body).
        with engine.connect() as conn:
            existing = _existing(conn, key, body_hash)
        if existing is None:
            raise
        log.debug("Idempotency-Key %r: order %d exists", key, existing)
        return PlaceResult(existing, False, None)
    body = {
        "id": order_id,
        "status": STATUS_PLACED,
        "priority": request.priority,
        "customer_email": request.customer_email,
        "currency": request.currency,
        "lines": lines,
        "total": format_money(total),
        "created_at": timestamp,
        "history": [],
        "timeline": [_placed_entry(timestamp)],
    }
    return PlaceResult(order_id, True, event, body, outbox_id, payload)


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


def _placed_entry(at: str) -> dict[str, Any]:
    """The first timeline entry of every order."""
    return {
        "type": envelope.ORDER_PLACED,
        "at": at,
        "status": lifecycle.PLACED,
        "effect": "advanced",
    }


def order_timeline(order: Order, history: list[Any]) -> list[dict[str, Any]]:
    """OrderPlaced, then each recorded outcome in recording order, through the state machine."""
    recorded = sorted(history, key=lambda entry: entry.id)
    entries = [_placed_entry(_rfc3339(order.created_at))]
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
        "priority": order.priority,
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
