"""Recording outcome events in an order's history and moving its status on.

The consumers report what they did as events; the order service's ``order-updates``
worker calls :func:`record_event` for each (or :func:`record_events` for a taken batch),
in its own transaction, and commits.
Recording is idempotent by event id, so a redelivered event changes nothing. The status
moves by :data:`orders.lifecycle.TRANSITIONS`, so events that arrive late, twice or out
of order never move an order backwards (see that module).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, bindparam, select, update
from sqlalchemy.orm import Session

from messaging import database, envelope
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


def _row(event: dict[str, Any]) -> dict[str, Any]:
    """The order_history row of an outcome event; ValueError naming what is wrong."""
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
    if not 1 <= order_id <= envelope.MAX_ORDER_ID:
        raise ValueError(f"event data.order_id must be between 1 and {envelope.MAX_ORDER_ID}")
    return {
        "event_id": event_id,
        "order_id": order_id,
        "type": event_type,
        "occurred_at": _occurred_at(event.get("timestamp")),
        "data": json.dumps(data, separators=(",", ":"), sort_keys=True),
    }


def _rows(
    events: list[dict[str, Any]],
) -> tuple[list[bool | Exception], list[tuple[int, dict[str, Any]]]]:
    """(per event: False, or its ValueError; the (index, row) of each good one)."""
    results: list[bool | Exception] = [False] * len(events)
    rows: list[tuple[int, dict[str, Any]]] = []
    for index, event in enumerate(events):
        try:
            rows.append((index, _row(event)))
        except ValueError as exc:
            results[index] = exc
    return results, rows


def _insert(session: Session) -> Any:
    """The dialect's INSERT (ON CONFLICT DO NOTHING ... RETURNING on both)."""
    return database.insert_of(session.get_bind().dialect)


def record_events(session: Session, events: list[dict[str, Any]]) -> list[bool | Exception]:
    """:func:`record_event` for a batch, in the caller's transaction, in four statements.

    What it computes (each row, the checks) is done before the first write, and the
    writes are one statement each: one multi-row INSERT of the history rows, one read
    of the affected orders' recorded types, one UPDATE of their statuses. So the
    transaction holds the database's write lock (SQLite's one writer) for about as long
    as one :func:`record_event` does, not once per event: POSTs waiting on that lock
    are not held up by a batch.

    Returns, per event in order: True (recorded), False (recorded before, or earlier in
    this batch) or the error that event alone raises in :func:`record_event`
    (ValueError, UnknownOrder), for the caller to settle; the others are recorded.
    """
    results, rows = _rows(events)
    if not rows:
        return results
    wanted = sorted({row["order_id"] for _, row in rows})
    # Lock the orders in id order (PostgreSQL; SQLite has one writer): two recorders
    # with overlapping batches then never wait on each other in a cycle.
    known = set(
        session.scalars(
            select(Order.id).where(Order.id.in_(wanted)).order_by(Order.id).with_for_update()
        )
    )
    good = []
    for index, row in rows:
        if row["order_id"] in known:
            good.append((index, row))
        else:
            results[index] = UnknownOrder(f"order {row['order_id']} does not exist")
    if not good:
        return results
    inserted = set(
        session.scalars(
            _insert(session)(OrderHistory)
            .values([row for _, row in good])
            .on_conflict_do_nothing(index_elements=["event_id"])
            .returning(OrderHistory.event_id)
        )
    )
    touched: set[int] = set()
    for index, row in good:
        if row["event_id"] in inserted:
            inserted.discard(row["event_id"])  # a second copy in this batch: False
            results[index] = True
            touched.add(row["order_id"])
    if touched:  # replayed from the whole history, read after our insert (as above)
        recorded: dict[int, list[str]] = {order_id: [] for order_id in touched}
        for order_id, event_type in session.execute(
            select(OrderHistory.order_id, OrderHistory.type)
            .where(OrderHistory.order_id.in_(touched))
            .order_by(OrderHistory.id)
        ):
            recorded[order_id].append(event_type)
        session.execute(
            update(Order),
            [
                {"id": order_id, "status": lifecycle.replay(types)}
                for order_id, types in recorded.items()
            ],
        )
    return results


SQL = database.DriverStatements(
    order=lambda dialect: (
        select(Order.id).where(Order.id == bindparam("order_id")).with_for_update()
    ),
    add=lambda dialect: (
        database.insert_of(dialect)(OrderHistory)
        .values(
            **database.binds("event_id", "order_id", "type", "occurred_at", "data"),
        )
        .on_conflict_do_nothing(index_elements=["event_id"])
        .returning(OrderHistory.id)
    ),
    types=lambda _dialect: (
        select(OrderHistory.type)
        .where(OrderHistory.order_id == bindparam("order_id"))
        .order_by(OrderHistory.id)
    ),
    status=lambda _dialect: (
        update(Order).where(Order.id == bindparam("order_id")).values(status=bindparam("status"))
    ),
)
""":func:`record_event_now`'s statements, compiled once per dialect."""


def record_event_now(engine: Engine, event: dict[str, Any]) -> bool:
    """:func:`record_event` in a transaction of its own, on the driver; committed.

    The same four statements as :func:`record_event` (lock the order, insert the row,
    read its history, set the status), compiled once and run on the DBAPI cursor
    (:class:`messaging.database.DriverStatement`): one event per message is the
    ``orders-updates`` worker's common case, and the ORM's session, identity map and
    flush cost it several times the statements' own work. Same returns and raises.
    """
    row = _row(event)
    order_id = row["order_id"]
    dialect = engine.dialect
    with database.driver_transaction(engine) as cursor:
        if SQL(dialect, "order").first(cursor, order_id=order_id) is None:
            raise UnknownOrder(f"order {order_id} does not exist")
        if SQL(dialect, "add").first(cursor, **row) is None:  # a duplicate: nothing inserted
            return False
        types = [
            event_type for (event_type,) in SQL(dialect, "types").execute(cursor, order_id=order_id)
        ]
        SQL(dialect, "status").execute(cursor, order_id=order_id, status=lifecycle.replay(types))
    return True


def record_events_now(engine: Engine, events: list[dict[str, Any]]) -> list[bool | Exception]:
    """:func:`record_events` in a transaction of its own, on the driver; committed.

    ``orders-updates``' batch path: the same results (True, False or the event's own
    error) and the same rows as :func:`record_events`, in statements compiled once
    (:data:`SQL`) instead of a multi-row INSERT and IN lists that SQLAlchemy compiles
    anew for every batch size. The orders are locked in id order first (PostgreSQL;
    SQLite has one writer), so two recorders never wait on each other in a cycle.
    """
    results, rows = _rows(events)
    if not rows:
        return results
    dialect = engine.dialect
    with database.driver_transaction(engine) as cursor:
        known = {
            order_id
            for order_id in sorted({row["order_id"] for _, row in rows})
            if SQL(dialect, "order").first(cursor, order_id=order_id) is not None
        }
        touched: set[int] = set()
        for index, row in rows:
            if row["order_id"] not in known:
                results[index] = UnknownOrder(f"order {row['order_id']} does not exist")
            elif SQL(dialect, "add").first(cursor, **row) is not None:
                results[index] = True
                touched.add(row["order_id"])
        for order_id in sorted(touched):  # replayed from the whole history, after the inserts
            recorded = SQL(dialect, "types").execute(cursor, order_id=order_id).fetchall()
            status = lifecycle.replay(event_type for (event_type,) in recorded)
            SQL(dialect, "status").execute(cursor, order_id=order_id, status=status)
    return results


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
    row = _row(event)
    order_id = row["order_id"]
    order = session.execute(
        select(Order).where(Order.id == order_id).with_for_update()
    ).scalar_one_or_none()
    if order is None:
        raise UnknownOrder(f"order {order_id} does not exist")

    result = session.execute(
        _insert(session)(OrderHistory)
        .values(**row)
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
