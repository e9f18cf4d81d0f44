"""Stuck orders and their automatic reconciliation, on real Redis and SQLite/PostgreSQL.

What "stuck" means is one function (orders.stuck.stuck_orders, tested in
test_stuck_orders.py), shared by the relay's automatic pass, the ``orders_stuck``
metric, ``orders-admin stuck`` and the dashboard. These tests show that the pass runs by
itself after a FLUSHALL, once per interval for the whole fleet (the Redis
lock), re-publishes each order once per RECONCILE_AFTER_SECONDS, stays away from a
backlog and only counts under PATTERN=pubsub.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import redis as redis_lib
from flask import Flask
from sqlalchemy import select, update

from messaging import envelope, keys
from orders.history import record_event
from orders.models import Order, Outbox
from orders.reconcile import AutoReconciler
from tests.helpers import BIN, Proc, wait_for
from tests.orders_app import ADMIN, order, outcome, wait_published

FULFILLED = (envelope.PAYMENT_CAPTURED, envelope.INVOICE_ISSUED, envelope.SHIPMENT_BOOKED)


def _place(app: Flask, n: int) -> list[int]:
    client = app.test_client()
    ids = []
    for i in range(n):
        response = client.post("/orders", json=order(customer_email=f"c{i}@example.com"))
        assert response.status_code == 201, response.get_json()
        ids.append(response.get_json()["id"])
    wait_published(app)
    return ids


def _record(app: Flask, order_id: int, *types: str, steps: tuple[str, ...] = ()) -> None:
    with app.extensions["orders"].sessions.begin() as session:
        for event_type in types:
            record_event(session, outcome(event_type, order_id))
        for step in steps:
            record_event(session, outcome(envelope.CUSTOMER_NOTIFIED, order_id, step=step))


def _age(app: Flask, seconds: float) -> None:
    """Make every order (and its outbox row) ``seconds`` older, as if placed back then."""
    with app.extensions["orders"].engine.begin() as conn:
        for table in (Order, Outbox):
            for row_id, created in conn.execute(select(table.id, table.created_at)).all():
                conn.execute(
                    update(table)
                    .where(table.id == row_id)
                    .values(created_at=created - timedelta(seconds=seconds))
                )


def _pending(redis: redis_lib.Redis, queue: str = "payment") -> list[int]:
    return [json.loads(m)["data"]["order_id"] for m in redis.lrange(keys.pending(queue), 0, -1)]


def _reconciler(app: Flask, client: redis_lib.Redis, owner: str, **kw: object) -> AutoReconciler:
    svc = app.extensions["orders"]
    options: dict[str, object] = {"interval": 0.2, "after": 0.0, "batch": 100} | kw
    return AutoReconciler(svc.engine, svc.publisher, client, owner=owner, **options)  # type: ignore[arg-type]


def _due(reconciler: AutoReconciler) -> AutoReconciler:
    reconciler._next = 0.0  # the interval has passed (the lock still decides)
    return reconciler


def test_one_relay_per_interval_republishes_each_stuck_order_once_after_a_flushall(
    make_app: Callable[..., Flask], redis_url: str, redis: redis_lib.Redis
) -> None:
    app = make_app(redis_url, RATE_LIMIT_PER_MINUTE="0")
    done, lost1, lost2 = _place(app, 3)
    _record(app, done, *FULFILLED, steps=("received", "shipped"))
    redis.flushall()  # Redis lost every job
    first, second = (
        _reconciler(app, redis, name, after=0.0, interval=60.0) for name in ("relay-a", "relay-b")
    )

    result = _due(first).maybe_run()
    assert result is not None and result.incomplete == [lost1, lost2]
    assert result.republished == 2
    assert _pending(redis) == [lost1, lost2], "the stored OrderPlaced, to its queue"
    assert redis.get(keys.RECONCILE_LOCK) == "relay-a"
    assert _due(second).maybe_run() is None, "the other relay waits for the lock"

    redis.delete(*(keys.pending(q) for q in envelope.queues_for(envelope.ORDER_PLACED)))
    redis.delete(keys.RECONCILE_LOCK)  # the interval is over
    again = _reconciler(app, redis, "relay-b", after=60.0)
    # Stuck still, but re-published less than RECONCILE_AFTER_SECONDS ago: not again.
    _age(app, 120)
    redis.set(keys.reconciled(lost1), "relay-a", ex=60)
    redis.set(keys.reconciled(lost2), "relay-a", ex=60)
    assert again.run_pass().republished == 0
    assert _pending(redis) == []
    redis.flushall()  # a second data loss takes the marks too: re-published again
    assert again.run_pass().republished == 2
    assert _pending(redis) == [lost1, lost2]


def test_marks_keep_each_order_to_one_republish_per_threshold(
    make_app: Callable[..., Flask], redis_url: str, redis: redis_lib.Redis
) -> None:
    app = make_app(redis_url, RATE_LIMIT_PER_MINUTE="0")
    lost = _place(app, 3)
    _age(app, 120)
    redis.flushall()
    reconciler = _reconciler(app, redis, "relay-a", batch=2, after=60.0)
    assert reconciler.run_pass().republished == 2, "bounded by the batch"
    assert 0 < redis.ttl(keys.reconciled(lost[0])) <= 60
    # The next pass skips the two marked and takes the third.
    assert _pending(redis) == lost[:2]
    for queue in envelope.queues_for(envelope.ORDER_PLACED):
        redis.delete(keys.pending(queue))
    assert reconciler.run_pass().republished == 1
    assert _pending(redis) == [lost[2]]


def test_no_republish_of_an_order_whose_message_is_still_in_a_queue(
    make_app: Callable[..., Flask], redis_url: str, redis: redis_lib.Redis
) -> None:
    """Pending, retrying, dead-lettered: slow or waiting for an operator, not lost.
    The order whose messages Redis lost is re-published, and so is one whose message
    only sits in a worker's processing list: after a power loss no thread may hold it
    (its re-publish is an idempotent no-op if one does)."""
    from messaging.queue import RedisQueue

    app = make_app(redis_url, RATE_LIMIT_PER_MINUTE="0")
    pending, retrying, held, dead, lost = _place(app, 5)
    raw = {o: redis.lindex(keys.pending("payment"), i) for i, o in enumerate(_pending(redis))}
    redis.flushall()
    queue = RedisQueue(redis, "payment")
    queue.push(raw[pending])
    redis.zadd(keys.delayed("invoice"), {raw[retrying]: 4e9})
    redis.sadd(keys.workers("shipping"), "w1")
    redis.rpush(keys.processing("shipping", "w1"), raw[held])
    updates = RedisQueue(redis, keys.ORDER_UPDATES_QUEUE)
    updates.push(raw[dead])
    assert updates.take("w2", 1, 1.0) == [raw[dead]]
    updates.fail("w2", raw[dead].encode(), "failed for good in the test", permanent=True)
    assert updates.stats()["dead"] == 1
    result = _reconciler(app, redis, "relay-a").run_pass()
    assert result.checked == 5 and result.republished == 2
    assert sorted(redis.lrange(keys.pending("email"), 0, -1)) == sorted([raw[lost], raw[held]])


def test_no_pass_while_the_queues_hold_a_backlog(
    make_app: Callable[..., Flask], redis_url: str, redis: redis_lib.Redis
) -> None:
    app = make_app(redis_url, RATE_LIMIT_PER_MINUTE="0")
    _place(app, 1)
    redis.flushall()
    redis.rpush(keys.pending("invoice"), *(f"job {n}" for n in range(21)))
    result = _reconciler(app, redis, "relay-a", batch=2).run_pass()  # bound: 10 x 2
    assert result.checked == 1 and result.republished == 0
    redis.ltrim(keys.pending("invoice"), 0, 19)
    assert _reconciler(app, redis, "relay-a", batch=2).run_pass().republished == 1


def test_pubsub_counts_stuck_orders_but_does_not_republish(
    make_app: Callable[..., Flask], redis_url: str, redis: redis_lib.Redis
) -> None:
    app = make_app(redis_url, "pubsub", RATE_LIMIT_PER_MINUTE="0")
    _place(app, 2)
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.ORDER_EVENTS_CHANNEL)
    result = _reconciler(app, redis, "relay-a", republish=False).run_pass()
    assert result.checked == 2 and result.republished == 0
    assert pubsub.get_message(timeout=0.5) is None, "nothing published again"
    pubsub.close()


def test_the_relay_reconciles_by_itself_after_a_flushall(
    make_app: Callable[..., Flask],
    database_url: str,
    redis_url: str,
    redis: redis_lib.Redis,
    tmp_path: Path,
) -> None:
    """A real ``orders-relay``: no operator runs ``--reconcile``; the orders are back on
    the payment queue once they have been stuck for RECONCILE_AFTER_SECONDS."""
    app = make_app(redis_url, RATE_LIMIT_PER_MINUTE="0")
    ids = _place(app, 3)
    redis.flushall()
    relay = Proc(
        [str(BIN / "orders-relay")],
        {
            "REDIS_URL": redis_url,
            "DATABASE_URL": database_url,
            "RELAY_INTERVAL": "0.1",
            "RECONCILE_INTERVAL_SECONDS": "0.5",
            "RECONCILE_AFTER_SECONDS": "1",
        },
        tmp_path / "relay.log",
    )
    try:
        wait_for(lambda: sorted(_pending(redis)) == ids, 30, 0.1, "the stuck orders re-published")
        assert "re-published OrderPlaced" in relay.output()
    finally:
        relay.kill()


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in the exposition")


def test_stuck_orders_and_reconciliation_are_metrics(
    make_app: Callable[..., Flask], redis_url: str, redis: redis_lib.Redis
) -> None:
    app = make_app(redis_url, RATE_LIMIT_PER_MINUTE="0", ORDER_STUCK_SECONDS="60")
    client = app.test_client()
    done, *_lost = _place(app, 3)

    def scrape() -> str:
        response = client.get("/metrics", headers=ADMIN)
        assert response.status_code == 200
        return response.get_data(as_text=True)

    assert _sample(scrape(), "orders_stuck") == 0, "just placed: not stuck yet"
    _age(app, 120)
    assert _sample(scrape(), "orders_stuck") == 3
    _record(app, done, *FULFILLED, steps=("received", "shipped"))
    assert _sample(scrape(), "orders_stuck") == 2
    before = _sample(scrape(), "orders_reconcile_republished_total")
    redis.flushall()
    assert _reconciler(app, redis, "relay-a", after=60.0).run_pass().republished == 2
    assert _sample(scrape(), "orders_reconcile_republished_total") == before + 2


def test_a_pass_that_cannot_reach_redis_is_skipped_not_raised(
    make_app: Callable[..., Flask], redis_url: str, redis: redis_lib.Redis
) -> None:
    """The pass runs inside the relay's loop: a Redis outage must not end the relay."""
    from devtools.redis_server import free_port

    app = make_app(redis_url, RATE_LIMIT_PER_MINUTE="0")
    _place(app, 1)
    down = redis_lib.Redis(port=free_port(), socket_connect_timeout=1)
    assert _due(_reconciler(app, down, "relay-a")).maybe_run() is None
    down.close()
