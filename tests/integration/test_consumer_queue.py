"""The reliable queue on a real Redis: ack, retry, promote, dead letters, reap, release.

Every test runs on one redis-server and on a Redis Cluster (the ``topology`` fixture):
each script's keys share the queue's hash tag, so each runs in one slot.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import pytest
import redis as redis_lib

from consumers.noop import NoopHandler
from messaging import envelope, keys
from messaging.queue import RedisQueue
from messaging.worker import Worker
from tests.helpers import wait_for
from tests.orders_app import order_placed

Q = "testq"


def raw(order_id: int = 1) -> bytes:
    """The same bytes for the same order id (a stable event id and timestamp)."""
    event = order_placed(
        order_id,
        event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"order/{order_id}")),
        timestamp="2026-01-01T00:00:00+00:00",
    )
    return envelope.dumps(event).encode()


def test_take_and_ack_in_batches(bredis: redis_lib.Redis) -> None:
    q = RedisQueue(bredis, Q)
    msgs = [raw(i) for i in range(1, 6)]
    q.push(*msgs)
    got = q.take("w1", 3, timeout=0)
    assert got == msgs[:3]
    assert bredis.lrange(keys.processing(Q, "w1"), 0, -1) == msgs[:3]
    assert bredis.lrange(keys.pending(Q), 0, -1) == msgs[3:]
    assert q.ack("w1", got) == 3
    assert bredis.llen(keys.processing(Q, "w1")) == 0
    assert q.stats()["processed"] == 3
    # An ack of something no longer ours counts nothing.
    assert q.ack("w1", got[:1]) == 0


def test_take_blocks_until_a_message_arrives(bredis: redis_lib.Redis) -> None:
    q = RedisQueue(bredis, Q)
    assert q.take("w1", 5, timeout=0.05) == []
    timer = threading.Timer(0.2, lambda: RedisQueue(bredis, Q).push(raw(1), raw(2)))
    timer.start()
    got = q.take("w1", 5, timeout=5)
    timer.join()
    # BLMOVE woke on the first push; the top-up may or may not see the second yet.
    assert got[0] == raw(1)
    rest = got[1:] or q.take("w1", 5, timeout=0)
    assert rest == [raw(2)]


def test_a_blocking_take_of_one_takes_one(bredis: redis_lib.Redis) -> None:
    """Three messages arrive at once while a worker with a batch of one waits: it gets
    one. (The top-up after BLMOVE asked the take script for ``count - 1`` = 0 more, and
    its LRANGE 0 -1 is the whole list: the worker took the backlog.)"""
    q = RedisQueue(bredis, Q)
    timer = threading.Timer(0.2, lambda: RedisQueue(bredis, Q).push(raw(1), raw(2), raw(3)))
    timer.start()
    got = q.take("w1", 1, timeout=5)
    timer.join()
    assert got == [raw(1)]
    assert bredis.lrange(keys.processing(Q, "w1"), 0, -1) == [raw(1)]
    assert bredis.lrange(keys.pending(Q), 0, -1) == [raw(2), raw(3)]


def test_retry_goes_to_delayed_with_backoff_then_promoted(bredis: redis_lib.Redis) -> None:
    q = RedisQueue(bredis, Q, backoff_base=10.0, backoff_max=100.0)
    message = raw(7)
    q.push(message)
    [taken] = q.take("w1", 1, timeout=0)
    now = 1_000_000.0
    assert q.fail("w1", taken, "boom", now=now) == "retried"
    assert bredis.llen(keys.processing(Q, "w1")) == 0
    [(member, score)] = bredis.zrange(keys.delayed(Q), 0, -1, withscores=True)
    assert member == message
    assert now <= score <= now + 10.0  # first retry: full jitter up to base
    state = bredis.hget(keys.attempts(Q), json.loads(message)["id"])  # "1 <first failure> 0"
    assert state is not None and state.split()[0] == b"1"
    assert q.promote(now=now - 1) == 0  # not due yet
    assert q.promote(now=now + 10.0) == 1
    assert bredis.lrange(keys.pending(Q), 0, -1) == [message]
    assert bredis.zcard(keys.delayed(Q)) == 0
    stats = q.stats()
    assert (stats["failed"], stats["retried"], stats["dead"]) == (1, 1, 0)


def test_dead_letter_after_max_attempts(bredis: redis_lib.Redis) -> None:
    q = RedisQueue(bredis, Q, max_attempts=3, backoff_base=0.0)
    message = raw(3)
    q.push(message)
    results = []
    for _ in range(3):
        [taken] = q.take("w1", 1, timeout=0)
        results.append(q.fail("w1", taken, "still broken"))
        q.promote(now=time.time() + 1)
    assert results == ["retried", "retried", "dead"]
    assert bredis.llen(keys.pending(Q)) == 0
    [letter] = q.dead_letters()
    assert letter.raw == message
    assert (letter.error, letter.attempts, letter.queue) == ("still broken", 3, Q)
    assert letter.failed_at.endswith("+00:00")
    assert bredis.hlen(keys.attempts(Q)) == 0
    entry = json.loads(bredis.lindex(keys.dead(Q), 0))  # type: ignore[arg-type]
    assert set(entry) == {"message", "error", "attempts", "failed_at", "queue", "cause"}
    assert entry["cause"] == "attempts"


def test_permanent_failure_is_dead_at_once(bredis: redis_lib.Redis) -> None:
    q = RedisQueue(bredis, Q)
    q.push(raw(1))
    [taken] = q.take("w1", 1, timeout=0)
    assert q.fail("w1", taken, "invalid data", permanent=True) == "dead"
    assert q.dead_letters()[0].attempts == 1
    assert bredis.zcard(keys.delayed(Q)) == 0


def test_requeue_and_purge_dead_letters(bredis: redis_lib.Redis) -> None:
    q = RedisQueue(bredis, Q)
    garbage = b"\xff\xfe not utf-8"
    q.push(raw(1), garbage, raw(2))
    for m in q.take("w1", 3, timeout=0):
        q.fail("w1", m, "bad", permanent=True)
    letters = q.dead_letters()
    assert [x.raw for x in letters] == [raw(1), garbage, raw(2)]
    assert letters[1].message.startswith("\ufffd")  # readable, and the bytes kept in b64
    assert q.requeue_dead(letters[:2]) == 2
    assert q.requeue_dead(letters[:2]) == 0  # already moved: no duplicates
    assert bredis.lrange(keys.pending(Q), 0, -1) == [raw(1), garbage]
    assert q.purge_dead() == 1
    assert q.dead_letters() == []


def test_release_puts_messages_back_in_order_at_the_head(bredis: redis_lib.Redis) -> None:
    q = RedisQueue(bredis, Q)
    q.push(raw(1), raw(2), raw(3), raw(4))
    taken = q.take("w1", 3, timeout=0)
    assert q.release("w1", taken[1:]) == 2
    assert bredis.lrange(keys.pending(Q), 0, -1) == [raw(2), raw(3), raw(4)]
    assert bredis.lrange(keys.processing(Q, "w1"), 0, -1) == [raw(1)]


def test_reaper_returns_a_dead_workers_messages_and_spares_live_ones(
    bredis: redis_lib.Redis,
) -> None:
    q = RedisQueue(bredis, Q)
    q.push(raw(1), raw(2), raw(3), raw(4))
    q.heartbeat("dead", ttl=1)
    q.heartbeat("alive", ttl=60)
    assert q.take("dead", 2, timeout=0) == [raw(1), raw(2)]
    assert q.take("alive", 1, timeout=0) == [raw(3)]
    reaped = wait_for(q.reap, timeout=5, message="the dead worker's heartbeat to expire")
    assert reaped == {"dead": 2}
    assert bredis.lrange(keys.pending(Q), 0, -1) == [raw(1), raw(2), raw(4)]
    assert bredis.smembers(keys.workers(Q)) == {b"alive"}
    assert bredis.lrange(keys.processing(Q, "alive"), 0, -1) == [raw(3)]
    # The reaped worker's late settlement neither duplicates nor loses anything.
    assert q.fail("dead", raw(1), "late") == "lost"
    assert q.ack("dead", [raw(2)]) == 0
    assert bredis.llen(keys.pending(Q)) == 3
    # A worker that comes back learns it was reaped.
    assert q.heartbeat("dead", ttl=60) is False
    assert q.heartbeat("dead", ttl=60) is True


def test_deregister_keeps_a_worker_with_messages_for_the_reaper(bredis: redis_lib.Redis) -> None:
    q = RedisQueue(bredis, Q)
    q.push(raw(1))
    q.heartbeat("w1", ttl=60)
    q.take("w1", 1, timeout=0)
    assert q.deregister("w1") is False
    assert q.reap() == {"w1": 1}  # heartbeat deleted: reaped at once
    q.heartbeat("w2", ttl=60)
    assert q.deregister("w2") is True
    assert bredis.scard(keys.workers(Q)) == 0


@pytest.mark.parametrize(
    ("garbage", "error"),
    [
        (b"\xff\xfe\x00garbage", "message is not UTF-8"),
        (b"not json at all", "message is not JSON"),
        (b"[1, 2]", "message is a JSON list, not an object"),
        (b'{"type": "OrderPlaced", "version": 1, "data": {}}', "message has no id"),
        (b'{"id": "x", "version": 1, "data": {}}', "message has no type"),
        (b'{"id": "x", "type": "Bogus", "version": 1, "data": {}}', "unknown event type 'Bogus'"),
        (b'{"id": "x", "type": "OrderPlaced", "version": 2, "data": {}}', "unsupported version 2"),
    ],
)
def test_worker_dead_letters_malformed_messages_and_goes_on(
    bredis: redis_lib.Redis, garbage: bytes, error: str
) -> None:
    q = RedisQueue(bredis, keys.NOOP_QUEUE)
    good = raw(5)
    q.push(garbage, good)
    stop = threading.Event()
    worker = Worker(q, NoopHandler(), _NoPublisher(), worker_id=f"t-{uuid.uuid4().hex}", stop=stop)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        wait_for(lambda: q.stats()["processed"] == 1, message="the good message to be processed")
    finally:
        stop.set()
        thread.join(10)
    [letter] = q.dead_letters()
    assert letter.raw == garbage
    assert error in letter.error
    assert q.stats()["in_flight"] == 0
    assert bredis.scard(keys.workers(keys.NOOP_QUEUE)) == 0  # deregistered


class _NoPublisher:
    def publish(self, event: dict[str, Any]) -> None:
        raise AssertionError("the noop handler emits nothing")


def test_worker_returns_messages_whose_take_reply_was_lost(bredis: redis_lib.Redis) -> None:
    """A take that moved messages but whose reply never arrived (a Redis blip) leaves
    them in the live worker's processing list; the sweep puts them back, and leaves
    alone what a thread still holds."""
    q = RedisQueue(bredis, keys.NOOP_QUEUE)
    worker = Worker(q, NoopHandler(), _NoPublisher(), worker_id=f"t-{uuid.uuid4().hex}")
    q.push(raw(1), raw(2), raw(3))
    held = q.take(worker.id, 1, 0)  # a thread holds this one
    worker._held.update(held)
    lost = q.take(worker.id, 2, 0)  # the reply to this take was "lost"
    assert len(lost) == 2 and q.in_flight(worker.id) == held + lost

    worker._release_orphans()

    assert q.in_flight(worker.id) == held
    assert bredis.lrange(keys.pending(keys.NOOP_QUEUE), 0, -1) == lost
