"""Reconciliation: re-publish OrderPlaced for orders whose outcomes never arrived.

The outbox guarantees that an event reaches Redis once; it cannot tell whether Redis
*kept* it. A Redis that crashes with ``appendfsync everysec`` loses up to about one
second of acknowledged writes: jobs pushed onto the queues (their outbox rows are
already marked published, so the relay will not send them again), outcome events on
``order-updates``, and acks. Failover to a replica that lagged behind loses writes in
the same way.

This pass finds every order placed between ``window`` and ``older_than`` seconds ago
that is not settled (:func:`orders.lifecycle.settled`: completed or cancelled, with
every email of that path recorded) and publishes its *stored* OrderPlaced event again:
the outbox row's payload, same event id. That is safe because every consumer dedupes
by event id and re-emits its stored outcome on a duplicate (same outcome event id,
which the order service records once): payment re-emits PaymentCaptured, which sends
invoice and shipping their jobs again, and so on down the chain. A consumer that never
got its job does it now.

Run it after an incident, or from cron: ``orders-relay --reconcile --older-than 60``.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from messaging import envelope
from messaging.publisher import EventPublisher
from orders import lifecycle
from orders.models import Order, OrderHistory, Outbox, utc_now

log = logging.getLogger("orders-relay")


@dataclass(frozen=True)
class ReconcileResult:
    """What one pass found and did."""

    checked: int
    """Orders in the time window."""
    incomplete: list[int]
    """Orders lacking an outcome."""
    republished: int
    """OrderPlaced events published again."""


def incomplete_orders(engine: Engine, older_than: float, window: float) -> tuple[int, list[int]]:
    """(orders in the window, ids of those not settled yet), oldest first."""
    now = utc_now()
    newest = now - timedelta(seconds=older_than)
    oldest = now - timedelta(seconds=window)
    with Session(engine) as session:
        rows = session.execute(
            select(Order.id, Order.status)
            .where(Order.created_at <= newest, Order.created_at >= oldest)
            .order_by(Order.id)
        ).all()
        if not rows:
            return 0, []
        steps: dict[int, set[str]] = defaultdict(set)
        for order_id, data in session.execute(
            select(OrderHistory.order_id, OrderHistory.data).where(
                OrderHistory.order_id.between(rows[0].id, rows[-1].id),
                OrderHistory.type == envelope.CUSTOMER_NOTIFIED,
            )
        ):
            steps[order_id].add(str(json.loads(data).get("step")))
    return len(rows), [r.id for r in rows if not lifecycle.settled(r.status, steps[r.id])]


def stored_order_placed(engine: Engine, order_ids: list[int]) -> dict[int, str]:
    """The outbox payload (the JSON as first published) of each order's OrderPlaced."""
    wanted = set(order_ids)
    found: dict[int, str] = {}
    if not wanted:
        return found
    with Session(engine) as session:
        created = session.scalars(select(Order.created_at).where(Order.id == min(wanted))).one()
        rows = session.execute(
            select(Outbox.payload).where(
                Outbox.type == envelope.ORDER_PLACED, Outbox.created_at >= created
            )
        )
        for (payload,) in rows:
            order_id = json.loads(payload).get("data", {}).get("order_id")
            if order_id in wanted:
                found[order_id] = payload
    return found


def reconcile(
    engine: Engine,
    publisher: EventPublisher,
    older_than: float = 60.0,
    window: float = 86400.0,
    batch: int = 100,
) -> ReconcileResult:
    """One pass: re-publish the stored OrderPlaced of every incomplete order.

    Raises redis.RedisError when Redis is down (run it again later: it is idempotent).
    """
    checked, incomplete = incomplete_orders(engine, older_than, window)
    payloads = stored_order_placed(engine, incomplete)
    missing = [i for i in incomplete if i not in payloads]
    if missing:  # cannot happen: the order and its outbox row commit together
        log.error("No stored OrderPlaced for orders %s", missing)
    todo = [payloads[i] for i in incomplete if i in payloads]
    for start in range(0, len(todo), batch):
        publisher.publish_serialized(
            (envelope.ORDER_PLACED, payload) for payload in todo[start : start + batch]
        )
    log.info(
        "Reconcile: %d orders checked, %d incomplete, %d OrderPlaced re-published",
        checked, len(incomplete), len(todo),
    )  # fmt: skip
    return ReconcileResult(checked, incomplete, len(todo))
