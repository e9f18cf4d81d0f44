"""PATTERN=pubsub workers (messaging.channel.ChannelWorker): what they promise, on real parts.

Real Redis and SQLite, the real PaymentHandler and its simulated gateway, the real
EventPublisher with ``PATTERN=pubsub``. The worker takes OrderPlaced from the order
channel (other types ignored), charges once per order and PUBLISHes the outcome; an
event published before it subscribed never reaches it; a failure goes onto its queue
for the usual retries (``flaky@example.com``: two gateway timeouts, then captured) and
garbage is dead-lettered there with its reason; on a graceful stop what it received but
did not start is kept on the queue.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from consumers import store
from consumers.payment import PaymentHandler, SimulatedGateway
from devtools.redis_server import RedisServer
from messaging import envelope, keys
from messaging.channel import ChannelWorker
from messaging.publisher import EventPublisher
from messaging.queue import RedisQueue
from tests.helpers import wait_for


def order_placed(order_id: int, email: str = "ada@example.com") -> dict[str, Any]:
    return envelope.envelope(
        envelope.ORDER_PLACED,
        {
            "order_id": order_id,
            "customer_email": email,
            "currency": "EUR",
            "lines": [{"sku": "B", "quantity": 1, "unit_price": "5.00", "line_total": "5.00"}],
            "total": "5.00",
        },
        message=f"order {order_id}",
        sender="test",
        count=order_id,
    )


@pytest.fixture
def bclient(redis: redis_lib.Redis, redis_url: str) -> Iterator[redis_lib.Redis]:
    client = redis_lib.Redis.from_url(redis_url)  # bytes, as the workers use it
    yield client
    client.close()


@pytest.fixture
def payment(bclient: redis_lib.Redis, tmp_path: Path) -> Iterator[Callable[[], ChannelWorker]]:
    engine = store.make_engine(f"sqlite:///{tmp_path / 'payment.db'}")
    store.create_tables(engine, "payment")
    made: list[ChannelWorker] = []

    def make() -> ChannelWorker:
        handler = PaymentHandler(engine, SimulatedGateway(engine, flaky_calls=2))
        worker = ChannelWorker(
            RedisQueue(bclient, keys.PAYMENT_QUEUE, backoff_base=0.05, backoff_max=0.2),
            handler,
            EventPublisher(bclient, "pubsub"),
            channel_concurrency=2,
            heartbeat_ttl=3,
            worker_id=f"channel-{uuid.uuid4().hex[:8]}",
        )
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.stop.set()
    engine.dispose()


class Listener:
    """What a subscriber of the order channel sees (the next services, the feed)."""

    def __init__(self, client: redis_lib.Redis) -> None:
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(keys.ORDER_EVENTS_CHANNEL)
        self.events: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        while (message := self.pubsub.get_message(timeout=0.05)) is not None:
            if message["type"] == "message":
                try:
                    self.events.append(json.loads(message["data"]))
                except ValueError:
                    pass  # the garbage a test publishes
        return self.events

    def outcomes(self, order_id: int) -> list[dict[str, Any]]:
        return [
            e for e in self.poll()
            if e["type"] != envelope.ORDER_PLACED and e["data"]["order_id"] == order_id
        ]  # fmt: skip


def charges(worker: ChannelWorker, order_id: int) -> int:
    engine = worker.handler.engine  # type: ignore[attr-defined]
    with Session(engine) as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(store.Payment)
                .where(store.Payment.order_id == order_id)
            )
            or 0
        )


def start(worker: ChannelWorker) -> threading.Thread:
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    wait_for(worker.subscribed.is_set, 30, 0.02, "subscribed")
    return thread


def test_takes_its_events_from_the_channel_once_and_publishes_the_outcome(
    bclient: redis_lib.Redis, payment: Callable[[], ChannelWorker]
) -> None:
    listener = Listener(bclient)
    publisher = EventPublisher(bclient, "pubsub")
    before = order_placed(1)
    publisher.publish(before)  # nobody of payment listens yet: gone for payment
    worker = payment()
    thread = start(worker)
    wait_for(lambda: bclient.scard(keys.workers(keys.PAYMENT_QUEUE)) >= 1, 30, 0.05, "registered")

    placed = order_placed(2)
    publisher.publish(placed)
    publisher.publish(placed)  # a duplicate: charged once, the same outcome again
    # Types payment does not work on are ignored, not dead-lettered.
    publisher.publish(
        envelope.envelope(
            envelope.INVOICE_ISSUED,
            {"order_id": 2, "invoice_number": "INV-1", "total": "5.00", "currency": "EUR"},
            message="i", sender="test", count=2,
        )
    )  # fmt: skip
    got = wait_for(lambda: len(listener.outcomes(2)) >= 3 and listener.outcomes(2), 30, 0.05,
                   "two PaymentCaptured on the channel")  # fmt: skip
    captured = [e for e in got if e["type"] == envelope.PAYMENT_CAPTURED]
    assert len(captured) == 2 and captured[0] == captured[1]  # the stored outcome, re-emitted
    assert charges(worker, 2) == 1
    assert charges(worker, 1) == 0 and not listener.outcomes(1)  # published before: missed
    wait_for(lambda: worker.ignored >= 1, 10, 0.05, "the InvoiceIssued ignored")
    queue = RedisQueue(bclient, keys.PAYMENT_QUEUE)
    wait_for(lambda: queue.stats()["processed"] >= 2, 10, 0.05, "counted as processed")
    assert queue.stats()["dead_letters"] == 0 and queue.stats()["pending"] == 0

    worker.stop.set()
    thread.join(30)
    assert not thread.is_alive()
    assert bclient.scard(keys.workers(keys.PAYMENT_QUEUE)) == 0  # deregistered


def test_failures_go_to_its_queue_retries_and_dead_letters(
    bclient: redis_lib.Redis, payment: Callable[[], ChannelWorker]
) -> None:
    listener = Listener(bclient)
    worker = payment()
    thread = start(worker)
    flaky = order_placed(7, email="flaky@example.com")  # two gateway timeouts, then ok
    EventPublisher(bclient, "pubsub").publish(flaky)
    bclient.publish(keys.ORDER_EVENTS_CHANNEL, b"\xff not an event")
    got = wait_for(lambda: listener.outcomes(7), 60, 0.05, "flaky's outcome after retries")
    assert [e["type"] for e in got] == [envelope.PAYMENT_CAPTURED]
    assert charges(worker, 7) == 1
    queue = RedisQueue(bclient, keys.PAYMENT_QUEUE)
    [letter] = wait_for(lambda: queue.dead_letters(), 30, 0.05, "the garbage dead-lettered")
    assert letter.raw == b"\xff not an event" and "not UTF-8" in letter.error
    assert queue.stats()["retried"] >= 1  # the queue side's backoff did the second timeout
    worker.stop.set()
    thread.join(30)


def test_a_graceful_stop_keeps_received_events_on_the_queue(
    bclient: redis_lib.Redis, payment: Callable[[], ChannelWorker]
) -> None:
    worker = payment()
    raws = [envelope.dumps(order_placed(n)).encode() for n in (11, 12, 13)]
    for raw in raws:
        worker.received.put(raw)  # received from the channel, not started yet
    worker.stop.set()  # SIGTERM before the handler threads got to them
    assert worker.run() == 0
    assert bclient.lrange(keys.pending(keys.PAYMENT_QUEUE), 0, -1) == raws


def test_subscribes_again_after_redis_restarts(
    redis_server_factory: Callable[..., RedisServer], tmp_path: Path
) -> None:
    """A Redis restart ends the subscription: the worker subscribes again by itself, and
    an event published after that is handled (what was published in between is gone)."""
    server = redis_server_factory()
    client = redis_lib.Redis.from_url(server.url)
    engine = store.make_engine(f"sqlite:///{tmp_path / 'payment.db'}")
    store.create_tables(engine, "payment")
    worker = ChannelWorker(
        RedisQueue(client, keys.PAYMENT_QUEUE),
        PaymentHandler(engine, SimulatedGateway(engine)),
        EventPublisher(client, "pubsub"),
        heartbeat_ttl=3,
    )
    thread = start(worker)
    try:
        assert worker.subscriptions == 1
        server.restart()
        wait_for(lambda: worker.subscriptions >= 2 and worker.subscribed.is_set(), 60, 0.05,
                 "subscribed again after the restart")  # fmt: skip
        listener = Listener(client)
        EventPublisher(client, "pubsub").publish(order_placed(21))
        got = wait_for(lambda: listener.outcomes(21), 30, 0.05, "the outcome after the restart")
        assert [e["type"] for e in got] == [envelope.PAYMENT_CAPTURED]
    finally:
        worker.stop.set()
        thread.join(30)
        client.close()
        engine.dispose()
