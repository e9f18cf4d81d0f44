"""Stuck orders: orders that stopped advancing, with their state, their age and what they wait for.

Why a view of its own: with ``PATTERN=pubsub`` the consumers take their events from
the channel, at most once; a consumer that was stopped while orders were placed never
sees them, and those orders simply stop. Nothing fails, nothing is dead-lettered: the
only trace is an order that does not move. Redis losing acknowledged writes (power
loss, a failover to a lagging replica) leaves the same trace in the other patterns.
So the order service lists them: every order that is not settled
(:func:`orders.lifecycle.settled`: a final state and every email of that path) and
whose last recorded step is older than a threshold (ORDER_STUCK_SECONDS), oldest first.

One function, :func:`stuck_orders`, serves the dashboard (``GET /api/orders/stuck``),
``orders-admin stuck`` and anything else that needs the figure.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from messaging import envelope
from orders import lifecycle
from orders.models import Order, OrderHistory, utc_now

DEFAULT_STUCK_SECONDS = 30.0
"""ORDER_STUCK_SECONDS' default: an order idle this long is listed as stuck."""
WINDOW_SECONDS = 86400.0
"""Only orders placed within this many seconds are looked at (one day)."""
MAX_LISTED = 100
"""Most stuck orders one answer lists (the total counts them all)."""

WAITING_FOR: dict[str, str] = {
    lifecycle.PLACED: "payment",
    lifecycle.PAID: "invoice and shipment",
    lifecycle.INVOICED: "shipment",
    lifecycle.SHIPPED: "invoice",
}
"""What an order in a non-final state waits for (the next service's work)."""


@dataclass(frozen=True)
class StuckOrder:
    """One order that stopped advancing."""

    order_id: int
    status: str
    placed_at: datetime
    last_step_at: datetime
    """When its last recorded step happened (its placing, if nothing since)."""
    age_seconds: float
    """Since it was placed."""
    idle_seconds: float
    """Since its last recorded step."""
    waiting_for: str
    """The work it waits for: ``payment``, ``invoice``, ``email shipped``..."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``GET /api/orders/stuck``)."""
        return {
            "id": self.order_id,
            "status": self.status,
            "placed_at": self.placed_at.isoformat(),
            "last_step_at": self.last_step_at.isoformat(),
            "age_seconds": round(self.age_seconds, 1),
            "idle_seconds": round(self.idle_seconds, 1),
            "waiting_for": self.waiting_for,
        }


@dataclass(frozen=True)
class StuckReport:
    """The stuck orders (oldest first, at most ``limit``) and how many there are in all."""

    older_than: float
    total: int
    orders: list[StuckOrder]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``GET /api/orders/stuck``)."""
        return {
            "older_than_seconds": self.older_than,
            "total": self.total,
            "orders": [o.to_dict() for o in self.orders],
        }


def waiting_for(status: str, notified_steps: set[str]) -> str:
    """What an unsettled order waits for, in words."""
    if status in WAITING_FOR:
        return WAITING_FOR[status]
    missing = sorted(lifecycle.NOTIFIED_STEPS.get(status, frozenset()) - notified_steps)
    return "email " + ", ".join(missing) if missing else "nothing"


def stuck_orders(
    session: Session,
    older_than: float = DEFAULT_STUCK_SECONDS,
    *,
    now: datetime | None = None,
    window: float = WINDOW_SECONDS,
    limit: int = MAX_LISTED,
) -> StuckReport:
    """Orders placed within ``window`` seconds that are not settled and idle ``older_than``.

    Idle means no step recorded for ``older_than`` seconds (an order in progress is not
    stuck). Reads the order service's own tables only.
    """
    now = now or utc_now()
    cutoff = now - timedelta(seconds=older_than)
    oldest = now - timedelta(seconds=window)
    # Settled orders have both emails of their path; anything with fewer is a candidate.
    emailed = (
        select(OrderHistory.order_id)
        .where(OrderHistory.type == envelope.CUSTOMER_NOTIFIED)
        .group_by(OrderHistory.order_id)
        .having(func.count() >= 2)
    )
    candidates = session.execute(
        select(Order.id, Order.status, Order.created_at)
        .where(
            Order.created_at >= oldest,
            Order.created_at <= cutoff,
            or_(Order.status.not_in(lifecycle.FINAL), Order.id.not_in(emailed)),
        )
        .order_by(Order.id)
    ).all()
    if not candidates:
        return StuckReport(older_than, 0, [])
    ids = [row.id for row in candidates]
    last: dict[int, datetime] = {}
    steps: dict[int, set[str]] = defaultdict(set)
    for chunk in range(0, len(ids), 500):
        part = ids[chunk : chunk + 500]
        history = select(
            OrderHistory.order_id, OrderHistory.type, OrderHistory.occurred_at, OrderHistory.data
        )
        for order_id, event_type, occurred_at, data in session.execute(
            history.where(OrderHistory.order_id.in_(part))
        ):
            if order_id not in last or occurred_at > last[order_id]:
                last[order_id] = occurred_at
            if event_type == envelope.CUSTOMER_NOTIFIED:
                steps[order_id].add(str(json.loads(data).get("step")))
    stuck: list[StuckOrder] = []
    for row in candidates:
        notified = steps[row.id]
        if lifecycle.settled(row.status, notified):
            continue
        last_step = max(row.created_at, last.get(row.id, row.created_at))
        if last_step > cutoff:
            continue  # still moving
        stuck.append(
            StuckOrder(
                order_id=row.id,
                status=row.status,
                placed_at=row.created_at,
                last_step_at=last_step,
                age_seconds=(now - row.created_at).total_seconds(),
                idle_seconds=(now - last_step).total_seconds(),
                waiting_for=waiting_for(row.status, notified),
            )
        )
    return StuckReport(older_than, len(stuck), stuck[:limit])
