"""Each crash window of the delivery promise, hit on purpose (see messaging/faults.py).

A real process (``consumer payment``, ``orders-api``, ``orders-relay``) runs with
``FAULT_POINT=<point>:exit`` on a real Redis and SQLite, dies at exactly that point
(exit 137, like a SIGKILL), and a clean process is started. Every test checks three
things: the armed process died where it was told to (its stderr line, its exit
status); nothing is lost and no effect is doubled; and the recovery path meant for
that window is the one that acted (the reaper's log line naming the dead worker and
how many messages it returned; the gateway ledger showing one call per order, i.e.
the redelivery took the stored outcome; the relay publishing a row whose claim had
expired).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import threading
import urllib.error
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from sqlalchemy import select
from sqlalchemy.orm import Session

from chaos.stack import order_body, post_order
from consumers import store
from devtools.procs import http_ok
from devtools.redis_server import free_port
from messaging import envelope as events
from messaging import faults, keys
from messaging.database import database_engine
from messaging.queue import RedisQueue
from orders.bootstrap import create_schema
from orders.models import Order, Outbox
from orders.service import place_order
from orders.validation import request_hash, validate_order
from tests.helpers import BIN, Proc, wait_for

HEARTBEAT_TTL = 2
"""Seconds: the dead worker's messages come back this long after its death."""
BATCH = 3


def order_placed(order_id: int) -> dict[str, Any]:
    return events.envelope(
        events.ORDER_PLACED,
        {
            "order_id": order_id,
            "customer_email": f"c{order_id}@example.com",
            "currency": "EUR",
            "lines": [{"sku": "SKU-1", "quantity": 1, "unit_price": "3.50", "line_total": "3.50"}],
            "total": "3.50",
        },
        message=f"Order #{order_id} placed",
        sender="orders-api",
        count=order_id,
    )


class Procs:
    """Starts the project's console scripts on one Redis; kills them all at the end."""

    def __init__(self, tmp: Path, redis_url: str) -> None:
        self.tmp = tmp
        self.orders_db = f"sqlite:///{tmp / 'orders.db'}"
        self.payment_db = f"sqlite:///{tmp / 'payment.db'}"
        self.base = {
            "REDIS_URL": redis_url,
            "REDIS_CONNECT_ATTEMPTS": "1",
            "LOG_LEVEL": "DEBUG",
            "CONSUMER_HEARTBEAT_TTL": str(HEARTBEAT_TTL),
            "CONSUMER_BATCH_SIZE": str(BATCH),
            "RELAY_INTERVAL": "0.1",
            "RELAY_CLAIM_SECONDS": "2",
        }
        self.procs: list[Proc] = []

    def start(self, script: str, *argv: str, **env: str) -> Proc:
        log = self.tmp / f"{script}-{len(self.procs)}.log"
        proc = Proc([str(BIN / script), *argv], {**self.base, **env}, log)
        self.procs.append(proc)
        return proc

    def payment(self, **env: str) -> Proc:
        return self.start("consumer", "payment", PAYMENT_DATABASE_URL=self.payment_db, **env)

    def orders(self, script: str, **env: str) -> Proc:
        return self.start(script, DATABASE_URL=self.orders_db, **env)

    def kill_all(self) -> None:
        for proc in self.procs:
            proc.kill()


@pytest.fixture
def procs(tmp_path: Path, redis: redis_lib.Redis, redis_url: str) -> Iterator[Procs]:
    running = Procs(tmp_path, redis_url)
    yield running
    running.kill_all()


@pytest.fixture
def bredis(redis: redis_lib.Redis, redis_url: str) -> Iterator[redis_lib.Redis]:
    client = redis_lib.Redis.from_url(redis_url)
    yield client
    client.close()


def died_at(proc: Proc, point: str) -> None:
    """The armed process exited 137 and said it did so at ``point``."""
    assert proc.popen.wait(30) == faults.EXIT_STATUS, proc.output()
    assert f"FAULT_POINT {point}: exit {faults.EXIT_STATUS}" in proc.output()


def worker_id(proc: Proc) -> str:
    found = re.search(r"worker (\S+) started", proc.wait_output(" started ("))
    assert found, proc.output()
    return found.group(1)


def queued(client: redis_lib.Redis, queue: str) -> list[dict[str, Any]]:
    return [json.loads(m) for m in client.lrange(keys.pending(queue), 0, -1)]


def ledger(url: str) -> dict[int, int]:
    """Gateway calls per order id (the simulated gateway's idempotency ledger)."""
    engine = store.make_engine(url)
    try:
        with Session(engine) as session:
            return {row.order_id: row.calls for row in session.scalars(select(store.GatewayCharge))}
    finally:
        engine.dispose()


# The messages of the armed worker's batch that it had emitted an outcome for before
# dying; the clean worker emits the stored outcome of every message again. The payment
# service handles a taken batch at once (one record transaction, one emit pipeline), so
# after_commit and after_emit are the batch's.
EMITTED_BEFORE_DEATH = {
    "worker.after_take": 0,
    "worker.after_commit": 0,
    "worker.after_emit": BATCH,
    "worker.before_ack": BATCH,
}


@pytest.mark.parametrize("point", sorted(EMITTED_BEFORE_DEATH))
def test_worker_killed_at_point_loses_nothing_and_charges_once(
    point: str, procs: Procs, bredis: redis_lib.Redis
) -> None:
    batch = [order_placed(i) for i in range(1, BATCH + 1)]
    RedisQueue(bredis, "payment").push(*(events.dumps(e) for e in batch))

    armed = procs.payment(FAULT_POINT=f"{point}:exit")
    dead = worker_id(armed)
    died_at(armed, point)
    # Died holding the whole batch: nothing acked, nothing back in pending yet.
    assert bredis.llen(keys.processing("payment", dead)) == BATCH
    assert bredis.llen(keys.pending("payment")) == 0
    emitted = queued(bredis, keys.ORDER_UPDATES_QUEUE)
    assert len(emitted) == EMITTED_BEFORE_DEATH[point]

    clean = procs.payment()
    # The recovery path that acted: this worker's reaper returned the dead one's batch.
    clean.wait_output(f"reaped worker {dead}, {BATCH} message(s) back to pending", timeout=30)
    wait_for(
        lambda: RedisQueue(bredis, "payment").stats()["processed"] == BATCH,
        timeout=30,
        message="the returned batch handled and acked",
    )
    stats = RedisQueue(bredis, "payment").stats()
    assert (stats["pending"], stats["in_flight"], stats["dead_letters"]) == (0, 0, 0)

    # One gateway call per order: the redelivered messages whose effect was committed
    # found their stored outcome (the event-id check) and never reached the gateway.
    assert ledger(procs.payment_db) == {e["data"]["order_id"]: 1 for e in batch}
    outcomes = queued(bredis, keys.ORDER_UPDATES_QUEUE)
    by_order = Counter(o["data"]["order_id"] for o in outcomes)
    ids: dict[int, set[str]] = defaultdict(set)
    for o in outcomes:
        ids[o["data"]["order_id"]].add(o["id"])
    for event in batch:
        order_id = event["data"]["order_id"]
        was_emitted = any(o["data"]["order_id"] == order_id for o in emitted)
        # Re-emitted after the redelivery when it had been emitted before the death,
        # and always with the same event id, so the recorder keeps one.
        assert by_order[order_id] == (2 if was_emitted else 1)
        assert len(ids[order_id]) == 1


def test_a_raise_before_the_ack_is_survived_by_the_worker_loop(
    procs: Procs, bredis: redis_lib.Redis
) -> None:
    batch = [order_placed(i) for i in range(1, BATCH + 1)]
    queue = RedisQueue(bredis, "payment")
    queue.push(*(events.dumps(e) for e in batch))
    worker = procs.payment(FAULT_POINT="worker.before_ack:raise")
    wait_for(lambda: queue.stats()["processed"] == BATCH, timeout=30, message="the batch acked")
    output = worker.output()
    assert "FAULT_POINT worker.before_ack: raise" in output
    # The recovery that acted: the loop kept the handled batch and acked it on its
    # next turn (no redelivery, no reaper).
    assert "unexpected error in worker loop" in output
    assert "reaped worker" not in output
    worker.check_alive()
    assert ledger(procs.payment_db) == {e["data"]["order_id"]: 1 for e in batch}
    outcomes = Counter(o["data"]["order_id"] for o in queued(bredis, keys.ORDER_UPDATES_QUEUE))
    assert outcomes == {e["data"]["order_id"]: 1 for e in batch}


def _api_address() -> tuple[str, dict[str, str]]:
    """A free port for one orders-api worker: its base URL and its environment."""
    port = free_port()
    return f"http://127.0.0.1:{port}", {
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "WEB_CONCURRENCY": "1",
    }


def _wait_api(proc: Proc, base: str) -> None:
    wait_for(lambda: http_ok(base + "/healthz") or not proc.alive(), 60, 0.1, "orders-api")
    proc.check_alive()


def test_api_killed_after_commit_the_relay_publishes_the_expired_claim(
    procs: Procs, bredis: redis_lib.Redis
) -> None:
    base, api_env = _api_address()
    armed = procs.orders(
        "orders-api", FAULT_POINT="api.after_commit:exit", RELAY_IN_PROCESS="0", **api_env
    )
    _wait_api(armed, base)
    with pytest.raises((urllib.error.URLError, ConnectionError)) as cut:
        post_order(base + "/orders", order_body(7), "fault-key-1")
    assert not isinstance(cut.value, urllib.error.HTTPError), cut.value  # no answer at all
    wait_for(lambda: "FAULT_POINT api.after_commit: exit 137" in armed.output(), 10)
    armed.terminate()

    engine = database_engine(procs.orders_db)
    try:
        with engine.connect() as conn:
            [row] = conn.execute(select(Outbox)).all()
        # Committed, not published: the fast path never ran, the row is still claimed.
        assert row.published_at is None and row.claimed_until is not None
        assert queued(bredis, "payment") == []
        claimed_until = row.claimed_until.replace(tzinfo=UTC)

        relay = procs.orders("orders-relay")
        relay.wait_output("Outbox relay published 1 events", timeout=30)
        with engine.connect() as conn:
            [after] = conn.execute(select(Outbox)).all()
        assert after.published_at is not None
        # The relay took the row only once its claim had expired.
        assert after.published_at.replace(tzinfo=UTC) >= claimed_until
        assert datetime.now(UTC) >= claimed_until
    finally:
        engine.dispose()
    [event] = queued(bredis, "payment")
    assert event["id"] == row.event_id

    # The client's retry with its Idempotency-Key finds the order: no second order.
    clean = procs.orders("orders-api", RELAY_IN_PROCESS="0", **api_env)
    _wait_api(clean, base)
    assert post_order(base + "/orders", order_body(7), "fault-key-1") == event["data"]["order_id"]
    assert len(queued(bredis, "payment")) == 1


def test_api_killed_before_its_background_publish_the_relay_publishes_the_claim(
    procs: Procs, bredis: redis_lib.Redis
) -> None:
    """The event waits in the worker's FastPublisher, its row claimed; the worker dies."""
    base, api_env = _api_address()
    armed = procs.orders(
        "orders-api", FAULT_POINT="api.before_publish:exit", RELAY_IN_PROCESS="0", **api_env
    )
    _wait_api(armed, base)
    # Committed and handed over: the 201 may or may not leave before the worker dies.
    # (cut before the headers, or, IncompleteRead, in the middle of the body).
    with contextlib.suppress(urllib.error.URLError, ConnectionError, http.client.HTTPException):
        post_order(base + "/orders", order_body(8), "fault-key-2")
    wait_for(lambda: "FAULT_POINT api.before_publish: exit 137" in armed.output(), 10)
    armed.terminate()

    engine = database_engine(procs.orders_db)
    try:
        with engine.connect() as conn:
            [row] = conn.execute(select(Outbox)).all()
        # Stored, not published, still claimed: only a relay, after the claim, sends it.
        assert row.published_at is None and row.claimed_until is not None
        assert queued(bredis, "payment") == []
        claimed_until = row.claimed_until.replace(tzinfo=UTC)

        relay = procs.orders("orders-relay")
        relay.wait_output("Outbox relay published 1 events", timeout=30)
        with engine.connect() as conn:
            [after] = conn.execute(select(Outbox)).all()
        assert after.published_at is not None
        assert after.published_at.replace(tzinfo=UTC) >= claimed_until
    finally:
        engine.dispose()
    [event] = queued(bredis, "payment")
    assert event["id"] == row.event_id

    clean = procs.orders("orders-api", RELAY_IN_PROCESS="0", **api_env)
    _wait_api(clean, base)
    assert post_order(base + "/orders", order_body(8), "fault-key-2") == event["data"]["order_id"]
    assert len(queued(bredis, "payment")) == 1


def test_api_killed_inside_a_group_commit_stores_none_of_it_and_retries_store_each_once(
    procs: Procs, bredis: redis_lib.Redis
) -> None:
    """Concurrent POSTs share one transaction; the worker dies before its commit."""
    base, api_env = _api_address()
    armed = procs.orders(
        "orders-api",
        FAULT_POINT="api.group_commit:exit",
        RELAY_IN_PROCESS="0",
        WEB_THREADS="8",
        **api_env,
    )
    _wait_api(armed, base)
    keys_sent: list[str] = []
    answered: dict[str, int] = {}
    # Bursts of 8 at once until two of them meet in one transaction (the first burst,
    # almost always: its first request leads alone, the others queue behind it).
    for burst in range(20):
        if "FAULT_POINT api.group_commit" in armed.output():
            break
        batch = [f"group-{burst}-{n}" for n in range(8)]
        keys_sent += batch
        barrier = threading.Barrier(len(batch))

        def post(key: str, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            with contextlib.suppress(
                urllib.error.URLError, ConnectionError, http.client.HTTPException
            ):
                answered[key] = post_order(base + "/orders", order_body(200), key)

        threads = [threading.Thread(target=post, args=(key,)) for key in batch]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    wait_for(lambda: "FAULT_POINT api.group_commit: exit 137" in armed.output(), 10)
    armed.terminate()

    engine = database_engine(procs.orders_db)
    try:
        with engine.connect() as conn:
            stored = {
                key: order_id
                for key, order_id in conn.execute(select(Order.idempotency_key, Order.id))
            }
            assert len(conn.execute(select(Outbox)).all()) == len(stored)
        # Every answer names a stored order; the dying transaction's orders (two or
        # more) are not stored, none of them half (no outbox row without its order).
        assert set(answered.items()) <= set(stored.items())
        assert len(stored) <= len(keys_sent) - 2

        # Each client retries with its key: every order once, the answered ones unchanged.
        clean = procs.orders("orders-api", **api_env)
        _wait_api(clean, base)
        retried = {key: post_order(base + "/orders", order_body(200), key) for key in keys_sent}
        assert {key: retried[key] for key in answered} == answered
        assert len(set(retried.values())) == len(keys_sent)
        with engine.connect() as conn:
            assert {
                key: order_id
                for key, order_id in conn.execute(select(Order.idempotency_key, Order.id))
            } == retried
            outbox = {
                json.loads(row.payload)["data"]["order_id"]: {row.event_id}
                for row in conn.execute(select(Outbox))
            }
        assert outbox.keys() == set(retried.values())
    finally:
        engine.dispose()

    # The relay in the clean worker sends what the dead one never published (once its
    # claim expired): every order's event arrives, always with its one event id. (An
    # event the dead worker published but had not marked yet is sent again, with the
    # same id, which the consumers drop: at least once, as for relay.after_publish.)
    def event_ids() -> dict[int, set[str]]:
        found: dict[int, set[str]] = defaultdict(set)
        for event in queued(bredis, "payment"):
            found[event["data"]["order_id"]].add(event["id"])
        return found

    wait_for(lambda: event_ids().keys() == outbox.keys(), 30, message="every order's event")
    assert event_ids() == outbox


def test_relay_killed_between_publish_and_mark_publishes_again_never_loses(
    procs: Procs, bredis: redis_lib.Redis
) -> None:
    engine = database_engine(procs.orders_db)
    create_schema(engine)
    placed = []
    for n in range(3):
        body = order_body(102 + n)  # plain customers: no scripted decline or flake
        # claim_seconds=0: born unclaimed, as if the fast path had failed at once.
        placed.append(place_order(engine, validate_order(body, 50), request_hash(body), None, 0))
    event_ids = {r.event["id"] for r in placed if r.event}
    try:
        armed = procs.orders("orders-relay", FAULT_POINT="relay.after_publish:exit")
        died_at(armed, "relay.after_publish")
        first = queued(bredis, "payment")
        assert {e["id"] for e in first} == event_ids and len(first) == 3
        with engine.connect() as conn:
            assert all(r.published_at is None for r in conn.execute(select(Outbox)))

        relay = procs.orders("orders-relay")
        # The recovery: the claims of the dead relay expired and this relay sent the
        # rows again (a duplicate per event, same id), then marked them.
        relay.wait_output("Outbox relay published 3 events", timeout=30)
        with engine.connect() as conn:
            rows = conn.execute(select(Outbox)).all()
        assert all(r.published_at is not None for r in rows)
    finally:
        engine.dispose()
    again = Counter(e["id"] for e in queued(bredis, "payment"))
    assert again == {event_id: 2 for event_id in event_ids}

    # The duplicates are absorbed by the consumer's event-id check: one charge each.
    procs.payment()
    wait_for(
        lambda: RedisQueue(bredis, "payment").stats()["processed"] == 6,
        timeout=30,
        message="both copies of every event handled",
    )
    assert sorted(ledger(procs.payment_db).values()) == [1, 1, 1]
    outcomes = Counter(o["id"] for o in queued(bredis, keys.ORDER_UPDATES_QUEUE))
    assert sorted(outcomes.values()) == [2, 2, 2]  # re-emitted with the stored id


def test_every_point_has_one_hit_in_the_code() -> None:
    root = Path(__file__).resolve().parents[2]
    calls = Counter(
        match
        for package in ("messaging", "orders", "consumers", "hello", "ops")
        for path in (root / package).rglob("*.py")
        for match in re.findall(r'faults\.hit\("([^"]+)"\)', path.read_text())
    )
    assert calls == dict.fromkeys(faults.POINTS, 1)


def test_a_bad_fault_point_is_one_line_and_exit_2(procs: Procs) -> None:
    proc = procs.payment(FAULT_POINT="worker.nowhere:exit")
    assert proc.popen.wait(30) == 2, proc.output()
    [line] = proc.output().splitlines()
    assert line.startswith("FAULT_POINT: unknown point 'worker.nowhere'")
