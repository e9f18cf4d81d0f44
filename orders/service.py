"""Placing an order: one transaction for the order, its lines and its OrderPlaced event.

The intake is the hot path (every POST): it runs three INSERTs compiled once by
SQLAlchemy on the driver's cursor (:class:`messaging.database.DriverInsert`), builds the
event and the response from the validated request, and never loads ORM objects.
Reads (``GET /orders``) keep the ORM, where it reads better.

Group commit: the orders of a process's concurrent requests are written by one
transaction (:class:`_GroupCommit`); each request is answered after that commit.

Idempotency: an ``Idempotency-Key`` is stored on the order (unique) with the SHA-256 of
the canonical request body. The same key with the same body returns the stored order
(``created`` False, no second row, no second event); with another body it is a 422
Problem. The key's unique index decides (no look-up first): the order's INSERT skips a
key that is taken (``ON CONFLICT DO NOTHING``), and the stored order is returned; of
two concurrent requests with one key, the loser returns the winner's order.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import weakref
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, NoReturn, cast

from sqlalchemy import Connection, Dialect, Engine, Table, bindparam, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, selectinload

from messaging import database, envelope, faults
from messaging.database import DriverInsert, driver_transaction
from orders import lifecycle
from orders.metrics import COMMIT_BATCH
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
        # A key used before skips the row (None): the caller answers with that order.
        self.orders = DriverInsert(
            _ORDERS, dialect, returning_id=True, skip_conflicts_on=("idempotency_key",)
        )
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


@dataclass
class _Placing:
    """One request's order, queued for a group commit until ``done``."""

    request: OrderRequest
    body_hash: str
    key: str | None
    claim_seconds: float
    now: datetime
    priced: list[tuple[int, Any, Decimal]]
    total: Decimal
    lines: list[dict[str, Any]]
    done: bool = False
    result: PlaceResult | None = None
    """Once done: the new order, or None when its key was taken (not inserted)."""
    error: BaseException | None = None
    """Once done: why the order was not stored (raised in the request's thread)."""


class _GroupCommit:
    """One engine's orders from concurrent requests of this process, in one transaction.

    Why: SQLite lets one writer in at a time. In a loaded server each order's own
    transaction held the write lock about three times as long as its work takes (each
    driver call gives up the GIL and waits to get it back), while the other requests
    queued for the lock. Now the request that finds no transaction of this process
    running *leads*: it takes every order queued so far, its own included, writes them
    in one transaction (one lock, one commit, the WAL's pages shared) and wakes their
    requests. Orders that arrive meanwhile queue for the next leader, so a batch is as
    large as the load makes it, and a server without concurrent requests writes each
    order at once, alone. On PostgreSQL the same saves round trips and commits.

    No guarantee changes: a request is answered only after the commit that stored its
    order, and an order that fails alone fails only its own request (:func:`_write`).
    The same idea as a database's group commit (PostgreSQL's ``commit_delay``, MySQL's
    binary log group commit), without waiting for company.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queued: list[_Placing] = []
        self._leading = False

    def place(self, engine: Engine, placing: _Placing) -> None:
        """Return once ``placing`` is done (by this thread or by another's batch).

        ``engine`` is the one this group belongs to (:func:`_group`); the group keeps
        no reference to it, so an engine no longer used goes away with its group.
        """
        with self._cond:
            self._queued.append(placing)
            while self._leading and not placing.done:
                self._cond.wait()
            if placing.done:
                return
            self._leading = True
            batch, self._queued = self._queued, []
        try:
            COMMIT_BATCH.observe(len(batch))
            _write(engine, batch)
        except BaseException as exc:  # interrupted: no order of it may wait forever
            for queued in batch:
                if not queued.done:
                    queued.error, queued.done = exc, True
            raise
        finally:
            with self._cond:
                self._leading = False
                self._cond.notify_all()


_GROUPS: weakref.WeakKeyDictionary[Engine, _GroupCommit] = weakref.WeakKeyDictionary()
_GROUPS_GUARD = threading.Lock()


def _group(engine: Engine) -> _GroupCommit:
    found = _GROUPS.get(engine)
    if found is None:
        with _GROUPS_GUARD:
            found = _GROUPS.get(engine)
            if found is None:
                found = _GROUPS[engine] = _GroupCommit()
    return found


def _write(engine: Engine, batch: list[_Placing]) -> None:
    """Insert the batch's orders in one transaction and mark each done.

    A failure that belongs to one order (a constraint, a value the database refuses)
    rolls the transaction back and each order is written again alone, so it fails only
    its own request. A failure of the database itself (``OperationalError``: locked,
    unreachable) fails every order of the batch. Orders are inserted in the order of
    their keys: two processes' batches with the same keys (a client retrying on another
    worker) take PostgreSQL's index locks in the same order, and cannot deadlock.
    """
    inserts = _inserts(engine)
    ordered = sorted(batch, key=lambda placing: (placing.key is None, placing.key or ""))
    try:
        with driver_transaction(engine) as cursor:
            results = [(placing, _insert(cursor, inserts, placing)) for placing in ordered]
            if len(batch) > 1:
                faults.hit("api.group_commit")
    except Exception as exc:
        if len(batch) > 1 and not isinstance(exc, OperationalError):
            for placing in batch:
                _write(engine, [placing])
            return
        for placing in batch:
            placing.error, placing.done = exc, True
        return
    for placing, result in results:
        placing.result, placing.done = result, True


def _insert(cursor: Any, inserts: _Inserts, placing: _Placing) -> PlaceResult | None:
    """One order's rows on the transaction's cursor; None when its key is taken."""
    request, now = placing.request, placing.now
    order_id = inserts.orders.one(
        cursor,
        {
            "customer_email": request.customer_email,
            "currency": request.currency,
            "total": placing.total,
            "status": STATUS_PLACED,
            "priority": request.priority,
            "created_at": now,
            "idempotency_key": placing.key,
            "request_hash": placing.body_hash,
        },
    )
    if order_id is None:
        return None
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
            for position, item, amount in placing.priced
        ],
    )
    timestamp = _rfc3339(now)
    total = format_money(placing.total)
    event = _order_placed(
        order_id, request.customer_email, request.currency, placing.lines, total, timestamp,
        request.priority,
    )  # fmt: skip
    payload = envelope.dumps(event)
    outbox_id = inserts.outbox(placing.claim_seconds).one(
        cursor,
        {
            "event_id": event["id"],
            "type": event["type"],
            "payload": payload,
            "created_at": now,
            "attempts": 0,
        },
    )
    body = {
        "id": order_id,
        "status": STATUS_PLACED,
        "priority": request.priority,
        "customer_email": request.customer_email,
        "currency": request.currency,
        "lines": placing.lines,
        "total": total,
        "created_at": timestamp,
        "history": [],
        "timeline": [_placed_entry(timestamp)],
    }
    return PlaceResult(order_id, True, event, body, outbox_id, payload)


def _raise_own(error: BaseException) -> NoReturn:
    """Raise a batch's error in one of its requests' threads, as a copy of its own.

    The batch's requests share the one exception; raised in several threads at once,
    its traceback would collect all their frames. The original stays the cause.
    """
    try:
        own = copy.copy(error)
    except Exception:  # noqa: BLE001 - an exception that cannot be rebuilt from its args
        raise error from None
    raise own from error


def place_order(
    engine: Engine,
    request: OrderRequest,
    body_hash: str,
    key: str | None = None,
    claim_seconds: float = 15.0,
) -> PlaceResult:
    """Store an order, its lines and its OrderPlaced outbox row in ONE transaction.

    Concurrent requests of one process share that transaction (:class:`_GroupCommit`);
    each is answered only after it commits.

    The Idempotency-Key is not looked up first: almost every key is new, and the key's
    unique index decides anyway. A key seen before skips the order's INSERT (and its
    lines and event), and the stored order with that key is returned, or a 422 when it
    was stored for another body. Two concurrent requests with one key race the same
    way: the loser answers with the winner's order.

    The outbox row is created already claimed for ``claim_seconds`` (on the database's
    clock, which the relays compare claims with): the caller
    publishes it right after commit (the fast path) and the relay leaves it alone until
    the claim expires, so the event is not sent twice by a relay racing the request.

    Raises:
        Problem: 422 when ``key`` was used before with another body.
    """
    priced = [
        (position, item, line_total(item.unit_price, item.quantity))
        for position, item in enumerate(request.items)
    ]
    placing = _Placing(
        request,
        body_hash,
        key,
        float(claim_seconds),
        utc_now(),
        priced,
        order_total(amount for _, _, amount in priced),
        [
            {
                "sku": item.sku,
                "quantity": item.quantity,
                "unit_price": format_money(item.unit_price),
                "line_total": format_money(amount),
            }
            for _, item, amount in priced
        ],
    )
    _group(engine).place(engine, placing)
    if placing.error is not None:
        _raise_own(placing.error)
    if placing.result is not None:
        return placing.result
    assert key is not None  # only a key's unique index skips an order
    # The key was used before (a retry), or a concurrent request with it committed
    # first: answer with that order (or 422 for another body).
    with engine.connect() as conn:
        existing = _existing(conn, key, body_hash)
    if existing is None:  # pragma: no cover - a skipped key's order is committed
        raise RuntimeError(f"Idempotency-Key {key!r} skipped, yet no order has it")
    log.debug("Idempotency-Key %r: order %d exists", key, existing)
    return PlaceResult(existing, False, None)


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
