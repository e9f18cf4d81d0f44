"""Recording outcome events in an order's history and moving its status on.

The consumers report what they did as events; the order service's ``order-updates``
worker calls :func:`record_event` for each, in its own transaction, and commits.
Recording is idempotent by event id, so a redelivered event changes nothing. The status
moves by :data:`orders.lifecycle.TRANSITIONS`, so events that arrive late, twice or out
of order never move an order backwards (see that module).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from orders import lifecycle
from orders.models import Order, OrderHistory

OUTCOME_TYPES = lifecycle.OUTCOME_TYPES


class UnknownOrder(LookupError):
    """The event names an order this service does not have."""


def _occurred_at(raw: Any) -> datetime:
    if not isinstance(raw, str):
        raise ValueError("event timestamp must be an RFC 3339 string")
    value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    if value.tzinfo is None:
        raise ValueError(f"event timestamp {raw!r} has no UTC offset")
    return value.astimezone(UTC)


def record_event(session: Session, event: dict[str, Any]) -> bool:
    """Add an outcome event to its order's history and update the order's status.

    Call it inside a transaction the caller commits. The order row is locked first
    (``SELECT ... FOR UPDATE`` on PostgreSQL) and the status is replayed from the whole
    history after the insert, so two outcomes of one order recorded at once both count.

    Args:
        session: An open session; the caller commits.
        event: A domain event envelope of an outcome type.

    Returns:
        True if recorded, False if this event id was recorded before.

    Raises:
        ValueError: The event is not an outcome event or is malformed.
        UnknownOrder: ``data.order_id`` names no order.
    """
    event_type = event.get("type")
    if event_type not in OUTCOME_TYPES:
        raise ValueError(f"not an outcome event type: {event_type!r}")
    data = event.get("data")
    event_id = event.get("id")
    if not isinstance(data, dict) or not isinstance(event_id, str) or not event_id:
        raise ValueError("event needs a string id and a data object")
    order_id = data.get("order_id")
    if isinstance(order_id, bool) or not isinstance(order_id, int):
        raise ValueError("event data.order_id must be an integer")
    occurred_at = _occurred_at(event.get("timestamp"))

    order = session.execute(
        select(Order).where(Order.id == order_id).with_for_update()
    ).scalar_one_or_none()
    if order is None:
        raise UnknownOrder(f"order {order_id} does not exist")

    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    result = session.execute(
        insert(OrderHistory)
        .values(
            event_id=event_id,
            order_id=order_id,
            type=event_type,
            occurred_at=occurred_at,
            data=json.dumps(data, separators=(",", ":"), sort_keys=True),
        )
        .on_conflict_do_nothing(index_elements=["event_id"])
        .returning(OrderHistory.id)
    )
    if result.scalar_one_or_none() is None:  # a duplicate: nothing inserted
        return False
    # Replay every recorded event in recording order, read after our insert: on SQLite
    # the insert holds the write lock (the SELECT of the order above may have read
    # before another recorder committed, pysqlite begins transactions at the first
    # write), on PostgreSQL the row lock does. So two outcomes of one order recorded at
    # once both count; the table makes the result independent of their order.
    order.status = lifecycle.replay(
        session.execute(
            select(OrderHistory.type)
            .where(OrderHistory.order_id == order_id)
            .order_by(OrderHistory.id)
        ).scalars()
    )
    session.flush()
    return True
