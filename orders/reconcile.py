"""Reconciliation: re-publish OrderPlaced for orders whose outcomes never arrived.

The outbox guarantees that an event reaches Redis once; it cannot tell whether Redis
*kept* it. A Redis that crashes with ``appendfsync everysec`` loses up to about one
second of acknowledged writes (jobs pushed onto the queues, whose outbox rows are
already marked published, outcome events on ``order-updates``, acks); a ``FLUSHALL``
(an operator's mistake, a cache tool pointed at the wrong Redis) loses all of them; a
failover to a replica that lagged behind loses writes in the same way.

A pass finds the orders :func:`orders.stuck.stuck_orders` names (placed within the
last day, not settled, no step recorded for ``older_than`` seconds) and publishes their *stored*
OrderPlaced event again: the outbox row's payload, same event id. That is safe because
every consumer's effect is unique per order and step in its own database (one payment
row per order, one invoice, one shipment, one email per order and step, each claimed
before it is done) and a consumer that already did its step re-emits its stored
outcome (same outcome event id, which the order service records once): payment
re-emits PaymentCaptured, which sends invoice and shipping their jobs again, and so on
down the chain. A consumer that never got its job does it now. Nothing is doubled.

Two ways to run it:

- **Automatically**, in every outbox relay (:class:`AutoReconciler`, each orders-api
  worker's relay thread and ``orders-relay``): every RECONCILE_INTERVAL_SECONDS each
  relay tries ``SET reconcile:lock <relay> NX PX <interval>``; the one that gets it runs
  the pass and nobody else does until the lock expires, so the fleet runs one pass per
  interval however many relays it has. The lock is for economy, not for correctness:
  the pass is idempotent (above), so two relays passing at once (a lock lost with a
  FLUSHALL, a pass slower than the interval) only send some duplicates, which the
  consumers absorb. It does not flood the queues: only orders stuck longer than
  RECONCILE_AFTER_SECONDS (default 300 s, far longer than an order takes), at most
  RECONCILE_BATCH per pass, each order at most once per RECONCILE_AFTER_SECONDS (a
  mark with that TTL in Redis; a data loss takes the marks with it, so the orders it
  left stuck are re-published again), never an order that still has a message in a
  consumer queue (pending, retrying, held by a worker, or dead-lettered and waiting
  for an operator: it is slow, not lost), and no pass at all while the queues hold a
  backlog of more than 10 x RECONCILE_BATCH messages. With ``PATTERN=pubsub`` the
  pass only counts: pub/sub is at-most-once by design, a consumer that was away
  missed its orders and they stay stuck (shown by ``orders_stuck``, ``orders-admin
  stuck`` and the dashboard) until an operator re-publishes them by hand.
- **By hand**: ``orders-relay --reconcile --older-than 60`` (every stuck order of the
  window at once, in any PATTERN).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import redis
from prometheus_client import Counter
from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from messaging import envelope, keys, monitor
from messaging.publisher import EventPublisher
from messaging.queue import DeadLetter
from orders import stuck as stuck_view
from orders.models import Order, Outbox
from orders.stuck import StuckOrder

log = logging.getLogger("orders-relay")

REPUBLISHED = Counter(
    "orders_reconcile_republished",
    "OrderPlaced events re-published by automatic reconciliation (stuck orders).",
)
PASSES = Counter(
    "orders_reconcile_passes", "Automatic reconciliation passes this process ran (held the lock)."
)


@dataclass(frozen=True)
class ReconcileResult:
    """What one pass found and did."""

    checked: int
    """Stuck orders the pass looked at."""
    incomplete: list[int]
    """Orders lacking an outcome (stuck)."""
    republished: int
    """OrderPlaced events published again."""


ALL = 10**9
"""``limit`` meaning every stuck order."""


def incomplete_orders(
    engine: Engine, older_than: float, window: float, limit: int = ALL
) -> list[StuckOrder]:
    """The stuck orders (:func:`orders.stuck.stuck_orders`), oldest first."""
    with Session(engine) as session:
        return stuck_view.stuck_orders(session, older_than, window=window, limit=limit).orders


def stored_order_placed(engine: Engine, orders: list[StuckOrder]) -> dict[int, str]:
    """The outbox payload (the JSON as first published) of each order's OrderPlaced.

    The order and its outbox row are written in one transaction with one timestamp, so
    only rows created within the orders' time span are read.
    """
    wanted = {o.order_id for o in orders}
    found: dict[int, str] = {}
    if not wanted:
        return found
    with Session(engine) as session:
        span = session.execute(
            select(Order.created_at).where(Order.id.in_(wanted)).order_by(Order.created_at)
        ).all()
        rows = session.execute(
            select(Outbox.payload).where(
                Outbox.type == envelope.ORDER_PLACED,
                Outbox.created_at.between(span[0][0], span[-1][0]),
            )
        )
        for (payload,) in rows:
            order_id = json.loads(payload).get("data", {}).get("order_id")
            if order_id in wanted:
                found[order_id] = payload
    return found


def _publish(
    engine: Engine, publisher: EventPublisher, stuck: list[StuckOrder], batch: int
) -> list[int]:
    """Publish the stored OrderPlaced of ``stuck``; returns the order ids published."""
    payloads = stored_order_placed(engine, stuck)
    missing = [o.order_id for o in stuck if o.order_id not in payloads]
    if missing:  # cannot happen: the order and its outbox row commit together
        log.error("No stored OrderPlaced for orders %s", missing)
    todo = [o.order_id for o in stuck if o.order_id in payloads]
    for start in range(0, len(todo), batch):
        publisher.publish_serialized(
            (envelope.ORDER_PLACED, payloads[i]) for i in todo[start : start + batch]
        )
    return todo


def reconcile(
    engine: Engine,
    publisher: EventPublisher,
    older_than: float = 60.0,
    window: float = 86400.0,
    batch: int = 100,
) -> ReconcileResult:
    """One pass by hand: re-publish the stored OrderPlaced of every stuck order.

    Raises redis.RedisError when Redis is down (run it again later: it is idempotent).
    """
    stuck = incomplete_orders(engine, older_than, window)
    done = _publish(engine, publisher, stuck, batch)
    log.info(
        "Reconcile: %d orders stuck, %d OrderPlaced re-published", len(stuck), len(done)
    )  # fmt: skip
    return ReconcileResult(len(stuck), [o.order_id for o in stuck], len(done))


DEAD_LETTERS_READ = 10_000
"""Most dead letters per queue read to find the orders that wait for an operator."""


def _order_id(raw: bytes | str) -> int | None:
    """The order id of a queue message or dead-letter entry (None: not an order's)."""
    try:
        data = json.loads(raw)
        if isinstance(data, dict) and "failed_at" in data and "message" in data:
            data = json.loads(DeadLetter.load(raw if isinstance(raw, bytes) else raw.encode()).raw)
        order_id = data.get("data", {}).get("order_id") if isinstance(data, dict) else None
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    return order_id if isinstance(order_id, int) and not isinstance(order_id, bool) else None


class AutoReconciler:
    """The automatic pass of one relay: at most one relay of the fleet per interval.

    Call :meth:`maybe_run` from the relay's loop; it returns at once unless the
    interval has passed and this relay wins the lock. See the module docstring for the
    lock and the flood guards.
    """

    def __init__(
        self,
        engine: Engine,
        publisher: EventPublisher,
        client: redis.Redis,
        *,
        owner: str,
        interval: float = 30.0,
        after: float = 300.0,
        batch: int = 100,
        window: float = stuck_view.WINDOW_SECONDS,
        republish: bool = True,
    ) -> None:
        self.engine = engine
        self.publisher = publisher
        self.client = client
        self.owner = owner
        self.interval = interval
        self.after = after
        self.batch = batch
        self.window = window
        self.republish = republish
        self._next = time.monotonic() + interval
        self._failing = False

    def maybe_run(self) -> ReconcileResult | None:
        """Run a pass if one is due and this relay gets the lock; never raises.

        Returns the pass's result, or None when no pass ran here.
        """
        if self.interval <= 0 or time.monotonic() < self._next:
            return None
        self._next = time.monotonic() + self.interval
        try:
            won = self.client.set(
                keys.RECONCILE_LOCK, self.owner, nx=True, px=max(1, int(self.interval * 1000))
            )
            if not won:
                return None
            result = self.run_pass()
        except (redis.RedisError, SQLAlchemyError) as exc:
            if not self._failing:
                log.error("Automatic reconciliation failed, retrying next interval: %s", exc)
                self._failing = True
            return None
        self._failing = False
        return result

    def orders_in_redis(self) -> set[int] | None:
        """Order ids of every message still in a consumer queue: pending, delayed or
        dead-lettered; None when the queues hold more
        than ``10 x batch`` pending or delayed messages (a backlog: do not look now).

        Such an order is not lost: it waits, is being worked on, retries, or waits for an
        operator (a dead letter re-published would only fail and be dead-lettered again).
        """
        bound = self.batch * 10
        pipe = self.client.pipeline(transaction=False)
        for queue in monitor.QUEUES:
            pipe.llen(keys.pending(queue))
            pipe.zcard(keys.delayed(queue))
        if sum(int(n) for n in pipe.execute()) > bound:
            return None
        # Not the workers' processing lists: after a power loss a processing list can
        # hold a message that no thread will finish (CI, 2026-12-02: orders 62 and 70
        # never completed, each with a message in flight). Re-publishing an order a
        # worker really holds costs one idempotent no-op; skipping it can lose it.
        pipe = self.client.pipeline(transaction=False)
        for queue in monitor.QUEUES:
            pipe.lrange(keys.pending(queue), 0, bound)
            pipe.zrange(keys.delayed(queue), 0, bound)
            pipe.lrange(keys.dead(queue), 0, DEAD_LETTERS_READ - 1)
        messages: list[Any] = []
        for reply in pipe.execute():
            messages += reply
        ids: set[int] = set()
        for raw in messages:
            order_id = _order_id(raw)
            if order_id is not None:
                ids.add(order_id)
        return ids

    def run_pass(self) -> ReconcileResult:
        """One pass, lock already held: find stuck orders, re-publish the due ones."""
        PASSES.inc()
        # Look past the batch: the oldest stuck orders may all be marked as re-published
        # recently, and newer ones still need their first re-publish.
        stuck = incomplete_orders(self.engine, self.after, self.window, self.batch * 4)
        ids = [o.order_id for o in stuck]
        if not stuck:
            return ReconcileResult(0, [], 0)
        if not self.republish:
            log.warning(
                "%d order(s) stuck for over %gs (PATTERN=pubsub: not re-published), oldest %s",
                len(stuck), self.after, ids[:10],
            )  # fmt: skip
            return ReconcileResult(len(stuck), ids, 0)
        in_redis = self.orders_in_redis()
        if in_redis is None:
            log.info(
                "%d order(s) stuck, but the queues hold a backlog: not re-published now",
                len(stuck),
            )  # fmt: skip
            return ReconcileResult(len(stuck), ids, 0)
        pipe = self.client.pipeline(transaction=False)
        for order_id in ids:
            pipe.exists(keys.reconciled(order_id))
        marked = pipe.execute()
        due = [
            o
            for o, seen in zip(stuck, marked, strict=True)
            if not seen and o.order_id not in in_redis
        ][: self.batch]
        done = _publish(self.engine, self.publisher, due, self.batch)
        if done:
            ttl = max(1, math.ceil(self.after))
            pipe = self.client.pipeline(transaction=False)
            for order_id in done:
                pipe.set(keys.reconciled(order_id), self.owner, ex=ttl)
            pipe.execute()
            REPUBLISHED.inc(len(done))
            log.warning(
                "Reconcile: %d order(s) stuck for over %gs; re-published OrderPlaced of %s",
                len(stuck), self.after, done[:20],
            )  # fmt: skip
        return ReconcileResult(len(stuck), ids, len(done))


def auto_reconciler(
    engine: Engine,
    publisher: EventPublisher,
    client: redis.Redis,
    *,
    owner: str,
    interval: float,
    after: float,
    batch: int,
    pattern: str,
) -> AutoReconciler:
    """The relay's reconciler; with PATTERN=pubsub it counts but does not re-publish."""
    return AutoReconciler(
        engine, publisher, client, owner=owner, interval=interval, after=after, batch=batch,
        republish=pattern != "pubsub",
    )  # fmt: skip
