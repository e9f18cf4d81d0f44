"""Time per stage, from the order service's own records: what the dashboard charts.

Why from the database: every outcome event recorded in an order's history carries the
time the consumer produced it (``occurred_at``), and every order its ``created_at``, so
"how long from placed to paid / invoiced / emailed" needs no other service's metrics.
A stage is an event type (OrderPlaced, PaymentCaptured, InvoiceIssued, ...); its
latency is ``occurred_at - created_at`` of its order. :func:`stage_timings` buckets the
last minutes: per stage and bucket the count (throughput) and the p50/p99 latency.
"""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from messaging import envelope
from orders.models import Order, OrderHistory

MAX_ROWS = 50_000
"""Most rows one answer reads (a bound on its cost under a flood of orders)."""


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile ``q`` (0-100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def stage_timings(
    session: Session, now: datetime, minutes: int, bucket_seconds: int
) -> dict[str, Any]:
    """Per stage: counts and p50/p99 latency (ms since placed) per bucket, and in all.

    Args:
        session: A session on the order service's database.
        now: The end of the window (UTC).
        minutes: The window's length.
        bucket_seconds: The width of one bucket.
    """
    since = now - timedelta(minutes=minutes)
    start = math.floor(since.timestamp() / bucket_seconds) * bucket_seconds
    buckets = list(range(start, int(now.timestamp()) + 1, bucket_seconds))
    samples: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    placed = session.execute(
        select(Order.created_at).where(Order.created_at >= since).limit(MAX_ROWS)
    ).scalars()
    for created in placed:
        bucket = math.floor(created.timestamp() / bucket_seconds) * bucket_seconds
        samples[envelope.ORDER_PLACED][bucket].append(0.0)
    rows = session.execute(
        select(OrderHistory.type, OrderHistory.occurred_at, Order.created_at)
        .join(Order, Order.id == OrderHistory.order_id)
        .where(OrderHistory.occurred_at >= since)
        .limit(MAX_ROWS)
    )
    for event_type, occurred, created in rows:
        bucket = math.floor(occurred.timestamp() / bucket_seconds) * bucket_seconds
        latency_ms = max(0.0, (occurred - created).total_seconds() * 1000)
        samples[event_type][bucket].append(latency_ms)
    stages: dict[str, Any] = {}
    for stage, by_bucket in sorted(samples.items(), key=lambda kv: kv[0] != "OrderPlaced"):
        every = [v for values in by_bucket.values() for v in values]
        stages[stage] = {
            "count": [len(by_bucket.get(b, [])) for b in buckets],
            "p50_ms": [percentile(by_bucket.get(b, []), 50) for b in buckets],
            "p99_ms": [percentile(by_bucket.get(b, []), 99) for b in buckets],
            "total": len(every),
            "total_p50_ms": percentile(every, 50),
            "total_p99_ms": percentile(every, 99),
        }
    return {
        "minutes": minutes,
        "bucket_seconds": bucket_seconds,
        "buckets": buckets,
        "stages": stages,
    }
