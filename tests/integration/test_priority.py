"""Express work on a real Redis: taken first, kept express through crash, retry, requeue.

Every queue test runs on one redis-server and on a Redis Cluster (the ``topology``
fixture): the express list and its streak counter share the queue's hash tag. The
anti-starvation rule (CONSUMER_EXPRESS_RATIO) is checked take by take, across calls.
"""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import pytest
import redis as redis_lib

from messaging import envelope, keys
from messaging.publisher import EventPublisher
from messaging.queue import RedisQueue
from messaging.worker import Worker
from tests.helpers import wait_for
from tests.orders_app import order_placed
from tests.topology import Topology

Q = "prioq"


def raw(order_id: int, express: bool = False) -> bytes:
    """A stable OrderPlaced message (same bytes for the same order), express or standard."""
    event = order_placed(
        order_id,
        express=express,
        event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"order/{order_id}")),
        timestamp="2026-01-01T00:00:00+00:00",
    )
    return envelope.dumps(event).encode()


def ids(messages: list[bytes]) -> list[int]:
    """The order ids (envelope counts) of messages."""
    return [int(json.loads(m)["count"]) for m in messages]


STANDARD = [raw(i) for i in range(1, 21)]
EXPRESS = [raw(1000 + i, express=True) for i in range(1, 21)]


def test_express_is_taken_before_a_standard_backlog(bredis: redis_lib.Redis) -> None:
    q = RedisQueue(bredis, Q)
    q.push(*STANDARD[:5])
    q.push(EXPRESS[0], EXPRESS[1])
    # Behind five standard messages they jumped the line, in their own order.
    assert bredis.lrange(keys.express(Q), 0, -1) == EXPRESS[:2]
    assert q.stats()["pending"] == 7 and q.stats()["express"] == 2
    assert q.take("w1", 3, timeout=0) == [EXPRESS[0], EXPRESS[1], STANDARD[0]]
    assert q.take("w1", 10, timeout=0) == STANDARD[1:5]


def test_express_on_an_idle_queue_wakes_a_blocked_worker(bredis: redis_lib.Redis) -> None:
    """No backlog, nothing to jump: it goes to pending, where BLMOVE is waiting."""
    q = RedisQueue(bredis, Q)
    timer = threading.Timer(0.2, lambda: RedisQueue(bredis, Q).push(EXPRESS[0]))
    timer.start()
    got = q.take("w1", 5, timeout=30)
    timer.join()
    assert got == [EXPRESS[0]]
    assert bredis.llen(keys.express(Q)) == 0


@pytest.mark.parametrize("batch", [1, 4])
def test_standard_work_gets_one_take_in_every_ratio_plus_one(
    bredis: redis_lib.Redis, batch: int
) -> None:
    """Ratio 3: E E E S E E E S ... while both wait, whatever the batch size; then the rest."""
    q = RedisQueue(bredis, Q, express_ratio=3)
    q.push(*STANDARD[:6])
    q.push(*EXPRESS[:12])
    order: list[bytes] = []
    while True:
        got = q.take("w1", batch, timeout=0)
        if not got:
            break
        order += got
        q.ack("w1", got)
    kinds = "".join("E" if m in EXPRESS else "S" for m in order)
    assert kinds == "EEESEEESEEESEEESSS"
    assert [m for m in order if m in EXPRESS] == EXPRESS[:12]  # each lane in order
    assert [m for m in order if m in STANDARD] == STANDARD[:6]
    # The express lane ran dry: the streak starts again from nothing.
    assert not bredis.exists(keys.express_streak(Q))


def test_a_take_that_carries_the_previous_ack_takes_the_same_and_acks_it(
    bredis: redis_lib.Redis,
) -> None:
    """take(ack=...) (the worker's loop) = ack, then take: the same order as above, and
    every message acked and counted once, on one server and on a cluster."""
    q = RedisQueue(bredis, Q, express_ratio=3)
    q.push(*STANDARD[:6])
    q.push(*EXPRESS[:12])
    order: list[bytes] = []
    got: list[bytes] = []
    while True:
        got = q.take("w1", 2, timeout=0, ack=got)
        if not got:
            break
        order += got
        assert q.in_flight("w1") == got  # the previous ones are gone from processing
    kinds = "".join("E" if m in EXPRESS else "S" for m in order)
    assert kinds == "EEESEEESEEESEEESSS"
    assert q.in_flight("w1") == []
    assert q.stats()["processed"] == 18
    assert q.take("w1", 2, timeout=0, ack=order[:1]) == []  # acked before: not again
    assert q.stats()["processed"] == 18


def test_a_crashed_workers_express_messages_return_to_the_express_lane(
    bredis: redis_lib.Redis,
) -> None:
    q = RedisQueue(bredis, Q)
    q.push(*STANDARD[:4])
    q.push(EXPRESS[0], EXPRESS[1])
    q.heartbeat("dead", 1)
    taken = q.take("dead", 4, timeout=0)
    assert taken == [EXPRESS[0], EXPRESS[1], STANDARD[0], STANDARD[1]]
    q.drop_heartbeat("dead")  # as if its TTL ran out
    assert q.reap() == {"dead": 4}
    # Each back at the head of its own lane, in order; express first again.
    assert bredis.lrange(keys.express(Q), 0, -1) == [EXPRESS[0], EXPRESS[1]]
    assert bredis.lrange(keys.pending(Q), 0, -1) == STANDARD[:4]
    # Crash suspects come one at a time (messaging.queue), express first.
    assert q.take("w2", 10, timeout=0) == [EXPRESS[0]]


def test_release_keeps_priority(bredis: redis_lib.Redis) -> None:
    q = RedisQueue(bredis, Q)
    q.push(*STANDARD[:3])
    q.push(EXPRESS[0])
    taken = q.take("w1", 3, timeout=0)
    assert taken == [EXPRESS[0], STANDARD[0], STANDARD[1]]
    assert q.release("w1", taken) == 3
    assert bredis.lrange(keys.express(Q), 0, -1) == [EXPRESS[0]]
    assert bredis.lrange(keys.pending(Q), 0, -1) == STANDARD[:3]


def test_a_retried_express_message_is_promoted_to_the_express_lane(
    bredis: redis_lib.Redis,
) -> None:
    q = RedisQueue(bredis, Q, backoff_base=10.0)
    q.push(*STANDARD[:3])
    q.push(EXPRESS[0])
    [first] = q.take("w1", 1, timeout=0)
    assert first == EXPRESS[0]
    now = 1_000_000.0
    assert q.fail("w1", first, "gateway timeout", now=now) == "retried"
    assert q.promote(now=now + 11.0) == 1
    assert bredis.lrange(keys.express(Q), 0, -1) == [EXPRESS[0]]
    assert q.take("w1", 2, timeout=0) == [EXPRESS[0], STANDARD[0]]


def test_a_requeued_express_dead_letter_is_taken_first(bredis: redis_lib.Redis) -> None:
    q = RedisQueue(bredis, Q)
    q.push(EXPRESS[0])
    [taken] = q.take("w1", 1, timeout=0)
    assert q.fail("w1", taken, "bad data", permanent=True) == "dead"
    [letter] = q.dead_letters()
    assert envelope.is_express(letter.raw)
    q.push(*STANDARD[:3])
    assert q.requeue_dead() == 1
    assert q.take("w1", 2, timeout=0) == [EXPRESS[0], STANDARD[0]]


def test_a_standard_message_never_lands_in_the_express_lane(bredis: redis_lib.Redis) -> None:
    """Garbage and standard messages (even ones that say "express" in data) stay standard."""
    q = RedisQueue(bredis, Q)
    odd = b'{"id":"x","data":{"note":"express"}}'
    q.push(*STANDARD[:2])
    q.push(odd, b"\xff\xfe not json", b'{"priority":"express"')
    assert bredis.llen(keys.express(Q)) == 0


class Captures:
    """A payment stand-in: every OrderPlaced becomes a PaymentCaptured."""

    queue = "payment"
    accepts = frozenset({envelope.ORDER_PLACED})

    def handle(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        order_id = event["data"]["order_id"]
        return [
            envelope.envelope(
                envelope.PAYMENT_CAPTURED,
                {"order_id": order_id, "payment_id": f"p{order_id}", "amount": "1.00",
                 "currency": "EUR"},
                message=f"Payment captured for order #{order_id}",
                sender="payment-service",
                count=order_id,
            )
        ]  # fmt: skip


def test_express_stays_express_down_the_flow(bredis: redis_lib.Redis, topology: Topology) -> None:
    """The publisher routes by the envelope; the worker marks outcomes of express events."""
    client = topology.client(decode_responses=False)
    publisher = EventPublisher(client, "queue")
    backlog = [envelope.envelope(
        envelope.PAYMENT_CAPTURED,
        {"order_id": i, "payment_id": f"b{i}", "amount": "1.00", "currency": "EUR"},
        message="backlog", sender="payment-service", count=i,
    ) for i in range(1, 4)]  # fmt: skip
    publisher.publish_many(backlog)  # standard work waiting on invoice and shipping
    payment = RedisQueue(client, "payment")
    payment.push(raw(7, express=True), raw(8))
    worker = Worker(payment, Captures(), publisher, batch_size=10)
    stop = worker.stop
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: payment.stats()["processed"] == 2, timeout=60)
    finally:
        stop.set()
        thread.join(30)
    for name in ("invoice", "shipping", keys.ORDER_UPDATES_QUEUE):
        # Order 7's capture jumped each queue's backlog; order 8's joined it at the back.
        assert ids(client.lrange(keys.express(name), 0, -1)) == [7], name
        assert ids(client.lrange(keys.pending(name), 0, -1)) == [1, 2, 3, 8], name
        assert ids(RedisQueue(client, name).take("t", 1, timeout=0)) == [7], name
    client.close()
