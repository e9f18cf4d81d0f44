"""Order intake against a real Redis and a real database (SQLite and PostgreSQL).

What is proven here: an accepted order is emitted per PATTERN; Redis down during POSTs
loses nothing and, once Redis is back, the relay emits each event exactly once; two
relays never publish the same row; concurrent retries with one Idempotency-Key create
one order and one event; a publish that fails part way is sent again whole by the relay.

Tests taking ``topology`` run on one redis-server and on a Redis Cluster, where the
three queues of an OrderPlaced live in three slots (docs/cluster.md).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest
import redis as redis_lib
from flask import Flask
from sqlalchemy import func, select

from messaging import envelope, keys
from orders.models import Order, Outbox
from orders.outbox import FastPublisher, Relay, mark_published, release
from orders.service import place_order
from orders.validation import request_hash, validate_order
from tests.helpers import wait_for
from tests.orders_app import ADMIN, ORDER, order
from tests.topology import Topology

QUEUE_KEYS = [keys.pending(q) for q in envelope.queues_for(envelope.ORDER_PLACED)]
"""The queues an OrderPlaced is pushed to (payment, email)."""


def _outbox(app: Flask) -> list[Outbox]:
    with app.extensions["orders"].sessions() as session:
        return list(session.scalars(select(Outbox).order_by(Outbox.id)))


def _count_orders(app: Flask) -> int:
    with app.extensions["orders"].sessions() as session:
        return int(session.scalar(select(func.count()).select_from(Order)) or 0)


def _relay(app: Flask, batch: int = 100) -> Relay:
    svc = app.extensions["orders"]
    return Relay(svc.engine, svc.publisher, batch=batch, interval=0.02, claim_seconds=15)


@pytest.mark.parametrize("pattern", ["pubsub", "queue", "both"])
def test_post_stores_and_emits_per_pattern(
    pattern: str, topology: Topology, make_app: Callable[..., Flask]
) -> None:
    app = make_app(topology.redis_url, pattern, **topology.env)
    redis = topology.client()
    pubsub = redis.pubsub()
    pubsub.subscribe(keys.ORDER_EVENTS_CHANNEL)
    wait_for(lambda: pubsub.get_message(timeout=0.1), message="subscribe confirmation")

    response = app.test_client().post("/orders", json=ORDER)

    assert response.status_code == 201
    body = response.get_json()
    assert response.headers["Location"] == f"/orders/{body['id']}"
    assert (body["total"], body["status"], body["history"]) == ("25.00", "placed", [])
    # Marked in a batch shortly after the publish (orders.outbox.PublishedMarker).
    [row] = wait_for(
        lambda: [r for r in _outbox(app) if r.published_at is not None], message="row marked"
    )
    assert row.claimed_until is None
    stored = json.loads(row.payload)
    assert stored["data"]["order_id"] == body["id"]

    # Every pattern: with queue only for the live feed (the order service's own event).
    message = wait_for(lambda: pubsub.get_message(timeout=0.1), message="order event")
    assert json.loads(message["data"]) == stored
    assert pubsub.get_message(timeout=0.2) is None  # once
    expected = 1 if pattern in ("queue", "both") else 0
    assert [redis.llen(k) for k in QUEUE_KEYS] == [expected] * len(QUEUE_KEYS)
    if expected:
        assert all(json.loads(redis.lindex(k, 0)) == stored for k in QUEUE_KEYS)
    assert redis.llen(keys.pending(keys.ORDER_UPDATES_QUEUE)) == 0
    pubsub.close()
    redis.close()


def test_redis_down_loses_nothing_and_relay_emits_each_once(
    redis_server_factory: Callable[..., Any],
    make_app: Callable[..., Flask],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = redis_server_factory(appendonly=True)
    app = make_app(server.url, "both")
    client = app.test_client()
    server.stop()

    ids = []
    for n in range(5):
        response = client.post("/orders", json=order(customer_email=f"c{n}@example.com"))
        assert response.status_code == 201
        ids.append(response.get_json()["id"])
    # The background publisher could not send them: it gave their claims back at once.
    wait_for(lambda: all(r.claimed_until is None for r in _outbox(app)), message="released")
    rows = _outbox(app)
    assert len(rows) == 5
    assert all(r.published_at is None for r in rows)

    relay = _relay(app)
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,))
    caplog.set_level(logging.INFO, logger="orders-relay")
    thread.start()
    try:
        # Several failed polls during the outage (each one counts an attempt) ...
        wait_for(lambda: min(r.attempts for r in _outbox(app)) >= 4, message="failed polls")
        server.start()
        check = redis_lib.Redis.from_url(server.url, decode_responses=True)
        wait_for(lambda: all(check.llen(k) >= 5 for k in QUEUE_KEYS), message="5 jobs per queue")
        wait_for(lambda: all(r.published_at for r in _outbox(app)), message="rows marked")
    finally:
        stop.set()
        thread.join(10)
    # ... logged once for the whole outage, and once when it ended.
    assert caplog.text.count("Redis is unavailable") == 1
    assert caplog.text.count("Redis is back") == 1
    assert relay.run_once() == 0  # nothing left to send
    for key in QUEUE_KEYS:
        jobs = [json.loads(j) for j in check.lrange(key, 0, -1)]
        assert len(jobs) == 5
        assert len({j["id"] for j in jobs}) == 5
        assert sorted(j["data"]["order_id"] for j in jobs) == sorted(ids)
    check.close()


def test_two_relays_never_publish_the_same_row(
    topology: Topology,
    redis_server_factory: Callable[..., Any],
    make_app: Callable[..., Flask],
) -> None:
    server = redis_server_factory()
    intake = make_app(server.url, "queue")
    server.stop()  # orders stay in the outbox, unclaimed
    for n in range(40):
        assert intake.test_client().post("/orders", json=order(currency="USD")).status_code == 201
        del n
    wait_for(
        lambda: all(r.claimed_until is None for r in _outbox(intake)), message="claims released"
    )
    relays = [_relay(make_app(topology.redis_url, "queue", **topology.env), batch=3)]
    relays.append(_relay(make_app(topology.redis_url, "queue", **topology.env), batch=3))
    stop = threading.Event()
    threads = [threading.Thread(target=r.run, args=(stop,)) for r in relays]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: all(r.published_at for r in _outbox(intake)), message="all published")
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    redis = topology.client()
    for key in QUEUE_KEYS:
        ids = [json.loads(j)["id"] for j in redis.lrange(key, 0, -1)]
        assert len(ids) == 40 and len(set(ids)) == 40
    redis.close()


def test_concurrent_retries_with_one_key_create_one_order(
    topology: Topology, make_app: Callable[..., Flask]
) -> None:
    app = make_app(topology.redis_url, "both", **topology.env)
    redis = topology.client()
    barrier = threading.Barrier(8)
    results: list[tuple[int, int]] = []

    def post() -> None:
        client = app.test_client()
        barrier.wait()
        response = client.post("/orders", json=ORDER, headers={"Idempotency-Key": "retry-1"})
        results.append((response.status_code, response.get_json()["id"]))

    threads = [threading.Thread(target=post) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    statuses = sorted(status for status, _ in results)
    assert statuses == [200] * 7 + [201]
    assert len({order_id for _, order_id in results}) == 1
    assert _count_orders(app) == 1
    assert len(_outbox(app)) == 1
    wait_for(lambda: all(r.published_at for r in _outbox(app)), message="row marked")
    assert [redis.llen(k) for k in QUEUE_KEYS] == [1] * len(QUEUE_KEYS)
    redis.close()


def test_same_key_other_body_is_422_and_emits_nothing(
    topology: Topology, make_app: Callable[..., Flask]
) -> None:
    redis = topology.client()
    app = make_app(topology.redis_url, "queue", **topology.env)
    client = app.test_client()
    first = client.post("/orders", json=ORDER, headers={"Idempotency-Key": "k"})
    other = client.post("/orders", json=order(currency="USD"), headers={"Idempotency-Key": "k"})
    assert first.status_code == 201
    assert other.status_code == 422
    assert other.content_type == "application/problem+json"
    assert other.get_json()["title"] == "Idempotency-Key reused with a different body"
    [row] = wait_for(lambda: [r for r in _outbox(app) if r.published_at], message="row marked")
    assert [redis.llen(k) for k in QUEUE_KEYS] == [1] * len(QUEUE_KEYS)
    redis.close()


def test_a_publish_failing_part_way_is_resent_whole_by_the_relay(
    topology: Topology, make_app: Callable[..., Flask]
) -> None:
    """One queue refuses the push (its key holds a string: WRONGTYPE), the others take it.

    The event is not marked published, so the relay sends it again once the queue is
    fixed: the queues that had it get a duplicate (same event id, dropped by the
    consumers), the one that failed gets it once. Nothing is lost. On a cluster the
    pushes go first and PUBLISH only after all succeeded; the single-node script
    publishes first, and Redis does not roll back a script's earlier writes on error.
    """
    app = make_app(topology.redis_url, "both", **topology.env)
    redis = topology.client()
    broken = QUEUE_KEYS[-1]
    redis.set(broken, "not a list")
    pubsub = redis.pubsub()
    pubsub.subscribe(keys.ORDER_EVENTS_CHANNEL)
    wait_for(lambda: pubsub.get_message(timeout=0.1), message="subscribe confirmation")

    assert app.test_client().post("/orders", json=ORDER).status_code == 201
    # The fast path failed: the claim is given back, the row left to the relay.
    [row] = wait_for(
        lambda: [r for r in _outbox(app) if r.claimed_until is None], message="claim released"
    )
    assert row.published_at is None
    event_id = json.loads(row.payload)["id"]
    if topology.cluster:
        assert pubsub.get_message(timeout=0.2) is None, "published before every queue had it"
    assert all(redis.llen(k) == 1 for k in QUEUE_KEYS if k != broken)

    relay = _relay(app)
    assert relay.run_once() == 0  # still broken: released again, not marked
    redis.delete(broken)
    assert relay.run_once() == 1
    assert relay.run_once() == 0
    [row] = _outbox(app)
    assert row.published_at is not None
    for key in QUEUE_KEYS:
        ids = [json.loads(j)["id"] for j in redis.lrange(key, 0, -1)]
        expected = 1 if key == broken else 3  # fast path + failed relay poll + good poll
        assert ids == [event_id] * expected, key
    pubsub.close()
    redis.close()


def test_list_is_newest_first_with_a_cursor(redis_url: str, make_app: Callable[..., Flask]) -> None:
    client = make_app(redis_url, "pubsub").test_client()
    ids = [client.post("/orders", json=ORDER).get_json()["id"] for _ in range(5)]
    first = client.get("/orders?limit=2", headers=ADMIN).get_json()
    second = client.get(f"/orders?limit=2&cursor={first['next_cursor']}", headers=ADMIN).get_json()
    last = client.get(f"/orders?limit=2&cursor={second['next_cursor']}", headers=ADMIN).get_json()
    seen = [o["id"] for page in (first, second, last) for o in page["items"]]
    assert seen == sorted(ids, reverse=True)
    assert last["next_cursor"] is None
    assert client.get("/orders", headers=ADMIN).get_json()["items"][0]["id"] == ids[-1]


def test_readyz_names_what_is_down(
    redis_server_factory: Callable[..., Any], make_app: Callable[..., Flask]
) -> None:
    server = redis_server_factory()
    client = make_app(server.url).test_client()
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.get_json()["checks"] == {"database": "ok", "redis": "ok"}
    server.stop()
    down = client.get("/readyz")
    assert down.status_code == 503
    assert down.content_type == "application/problem+json"
    assert down.get_json()["checks"] == {"database": "ok", "redis": "down"}
    assert "redis" in down.get_json()["detail"]
    assert client.get("/healthz").status_code == 200


def test_fast_path_marks_in_batches_and_the_relay_never_resends(
    redis: redis_lib.Redis, redis_url: str, make_app: Callable[..., Flask]
) -> None:
    """Published rows wait (claimed) for the batch mark; the relay leaves them alone."""
    from orders.api import PUBLISHER

    app = make_app(redis_url, "queue")
    client = app.test_client()
    for n in range(20):
        headers = {"Idempotency-Key": f"batch-{n}"}
        assert client.post("/orders", json=ORDER, headers=headers).status_code == 201
    relay = _relay(app)
    assert relay.run_once() == 0  # every row is claimed by its request until marked
    wait_for(lambda: all(r.published_at for r in _outbox(app)), message="rows marked")
    assert app.extensions[PUBLISHER].pending() == 0
    assert app.extensions[PUBLISHER].marker.pending() == 0
    assert all(r.claimed_until is None and r.attempts == 1 for r in _outbox(app))
    assert relay.run_once() == 0
    for key in QUEUE_KEYS:
        ids = [json.loads(j)["id"] for j in redis.lrange(key, 0, -1)]
        assert len(ids) == 20 and len(set(ids)) == 20


def test_an_event_that_waited_past_half_its_claim_is_left_to_the_relay(
    redis: redis_lib.Redis, redis_url: str, make_app: Callable[..., Flask]
) -> None:
    """Sent that late, it could race the relay, which takes the row once the claim ends."""
    app = make_app(redis_url, "queue")
    svc = app.extensions["orders"]
    placed = place_order(svc.engine, validate_order(ORDER), request_hash(ORDER), None, 30)
    assert placed.outbox_id is not None and placed.payload is not None
    late = FastPublisher(svc.engine, svc.publisher, max_wait=0.0)
    late.submit(placed.outbox_id, envelope.ORDER_PLACED, placed.payload)
    late.close()  # sends what is queued and fresh enough, then marks
    [row] = _outbox(app)
    assert row.published_at is None and row.claimed_until is not None  # the request's claim
    assert [redis.llen(k) for k in QUEUE_KEYS] == [0] * len(QUEUE_KEYS)

    in_time = FastPublisher(svc.engine, svc.publisher, max_wait=15.0)
    in_time.submit(placed.outbox_id, envelope.ORDER_PLACED, placed.payload)
    in_time.close()
    [row] = _outbox(app)
    assert row.published_at is not None and row.claimed_until is None
    for key in QUEUE_KEYS:
        assert [json.loads(j)["id"] for j in redis.lrange(key, 0, -1)] == [row.event_id]


def test_an_express_order_jumps_the_queues_backlog(
    topology: Topology, make_app: Callable[..., Flask]
) -> None:
    """POST priority express: stored, and its OrderPlaced goes ahead of waiting work."""
    app = make_app(topology.redis_url, "queue", **topology.env)
    client = app.test_client()
    assert client.post("/orders", json=ORDER).status_code == 201  # standard: the backlog
    response = client.post("/orders", json=order(priority="express"))
    assert response.status_code == 201
    express_id = response.get_json()["id"]
    redis = topology.client()
    for queue in envelope.queues_for(envelope.ORDER_PLACED):
        waiting = wait_for(lambda q=queue: redis.lrange(keys.express(q), 0, -1), message=queue)
        [event] = [json.loads(m) for m in waiting]
        assert (event["data"]["order_id"], event["priority"]) == (express_id, "express")
        assert event["data"]["priority"] == "express"
        assert [
            json.loads(m)["data"]["order_id"] for m in redis.lrange(keys.pending(queue), 0, -1)
        ] == [express_id - 1]
    assert client.get(f"/orders/{express_id}", headers=ADMIN).get_json()["priority"] == "express"


def test_marking_and_releasing_touch_exactly_the_named_unpublished_rows(
    redis_url: str, make_app: Callable[..., Flask]
) -> None:
    """The driver-level UPDATEs of :func:`orders.outbox.mark_published` and
    :func:`~orders.outbox.release`: id lists padded to a power of two and split past 512
    still change each named row once, never a row not named, never a row marked before."""
    from datetime import timedelta

    from sqlalchemy import insert

    from orders.models import utc_now

    app = make_app(redis_url, "queue")
    engine = app.extensions["orders"].engine
    claim = utc_now() + timedelta(seconds=600)
    with engine.begin() as conn:
        conn.execute(
            insert(Outbox),
            [
                {
                    "event_id": f"event-{n}", "type": envelope.ORDER_PLACED, "payload": "{}",
                    "created_at": utc_now(), "claimed_until": claim, "attempts": 0,
                }
                for n in range(1, 1201)
            ],
        )  # fmt: skip
    marked = [1, 2, 3, *range(100, 700)]  # 603 ids: a statement of 512, one of 128 (91 padded)
    mark_published(engine, marked)
    mark_published(engine, [2, 3, 5])  # 2 and 3 were marked: only 5 changes
    released = [900, 901, 902, 3]  # 3 is published: not released
    release(engine, released)
    release(engine, [])
    mark_published(engine, [])
    rows = {row.id: row for row in _outbox(app)}
    assert len(rows) == 1200
    for outbox_id, row in rows.items():
        if outbox_id in (*marked, 5):
            assert row.published_at is not None, outbox_id
            assert (row.claimed_until, row.attempts) == (None, 1), outbox_id
        elif outbox_id in released:
            assert (row.published_at, row.claimed_until, row.attempts) == (None, None, 1)
        else:
            assert row.published_at is None and row.claimed_until is not None, outbox_id
            assert row.attempts == 0, outbox_id


def test_the_relay_probe_sees_exactly_the_rows_a_claim_would_take(
    redis_url: str, make_app: Callable[..., Flask]
) -> None:
    """:meth:`Relay.claimable` (the read that spares an empty claim its write
    transaction) is true when, and only when, ``claim`` would take a row."""
    from sqlalchemy import update

    from messaging import database

    app = make_app(redis_url, "queue")
    svc = app.extensions["orders"]
    relay = _relay(app)
    assert not relay.claimable()  # no rows
    placed = place_order(svc.engine, validate_order(ORDER), request_hash(ORDER), None, 30)
    assert not relay.claimable() and relay.claim() == []  # born claimed by its request
    dialect = svc.engine.dialect.name
    with svc.engine.begin() as conn:  # the request's process died: its claim expired
        conn.execute(update(Outbox).values(claimed_until=database.now_plus(dialect, -1)))
    assert relay.claimable()
    assert [row[0] for row in relay.claim()] == [placed.outbox_id]
    assert not relay.claimable()  # claimed by this relay now
    with svc.engine.begin() as conn:  # a claim that never was (a row from before claims)
        conn.execute(update(Outbox).values(claimed_until=None))
    assert relay.claimable()
    mark_published(svc.engine, [placed.outbox_id])
    assert not relay.claimable() and relay.claim() == []  # published
