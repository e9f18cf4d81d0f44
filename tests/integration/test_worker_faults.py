"""The worker against hard Redis faults on real servers: a failover that answers READONLY,
handler threads that die or hang (liveness), and what the reaper does with a message
that keeps killing its workers."""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis as redis_lib

from devtools.redis_server import Failover, RedisServer
from messaging import envelope, keys
from messaging.queue import RedisQueue
from messaging.worker import EXIT_UNHEALTHY, Worker
from tests.helpers import wait_for

Q = "faults"


def message(n: int) -> bytes:
    event = envelope.envelope(
        envelope.ORDER_PLACED,
        {"order_id": n},
        message=f"Order #{n} placed",
        sender="test",
        count=n,
        event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"faults/{n}")),
        timestamp="2026-01-01T00:00:00+00:00",
    )
    return envelope.dumps(event).encode()


class Recorder:
    """A handler that records what it handled; ``gate`` holds the first message."""

    queue = Q
    accepts = frozenset({envelope.ORDER_PLACED})

    def __init__(self, on_first: Callable[[], None] | None = None) -> None:
        self.handled: list[int] = []
        self.entered = threading.Event()
        self.on_first = on_first

    def handle(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        if not self.entered.is_set():
            self.entered.set()
            if self.on_first is not None:
                self.on_first()
        self.handled.append(int(event["data"]["order_id"]))
        return []


class NoPublisher:
    def publish(self, event: dict[str, Any]) -> None:
        raise AssertionError("nothing to publish")


def run_in_thread(worker: Worker) -> tuple[threading.Thread, list[int]]:
    code: list[int] = []
    thread = threading.Thread(target=lambda: code.append(worker.run()), daemon=True)
    thread.start()
    return thread, code


@pytest.fixture
def pair(redis_server_factory: Callable[..., RedisServer]) -> Iterator[Failover]:
    primary = redis_server_factory()
    standby = redis_server_factory()
    failover = Failover(primary, standby)
    failover.attach()
    yield failover


def test_worker_survives_a_failover_that_answers_readonly(pair: Failover) -> None:
    """The ack of a handled message meets READONLY (the primary was demoted meanwhile):
    the thread keeps the message, backs off, and acks it after the failback; then it
    goes on consuming. Before the fix the thread died and the process heartbeat on."""
    client = redis_lib.Redis.from_url(pair.primary.url)
    q = RedisQueue(client, Q)
    release = threading.Event()
    handler = Recorder(on_first=lambda: release.wait(30))
    stop = threading.Event()
    worker = Worker(q, handler, NoPublisher(), concurrency=1, batch_size=1, stop=stop)
    thread, _code = run_in_thread(worker)
    try:
        q.push(message(1))
        assert handler.entered.wait(10)
        pair.fail_over()  # the worker's Redis is now a replica: every write is READONLY
        release.set()  # the handler returns; the ack meets READONLY
        wait_for(lambda: worker._redis_down, message="the worker to meet READONLY")
        pair.fail_back()
        q.push(message(2))
        wait_for(lambda: q.stats()["processed"] == 2, 20, message="both messages acked")
        assert handler.handled == [1, 2]
        assert all(t.is_alive() for t in worker._consumers)
        assert q.stats()["in_flight"] == 0 and q.stats()["pending"] == 0
        assert client.exists(keys.heartbeat(Q, worker.id))
    finally:
        stop.set()
        release.set()
        thread.join(15)
        client.close()


class Dies:
    """A handler whose thread dies without an exception the loop would catch."""

    queue = Q
    accepts = frozenset({envelope.ORDER_PLACED})

    def handle(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        raise SystemExit("a library called sys.exit() in a worker thread")


class Hangs:
    queue = Q
    accepts = frozenset({envelope.ORDER_PLACED})

    def __init__(self) -> None:
        self.forever = threading.Event()

    def handle(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        self.forever.wait(60)
        return []


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("make_handler", [Dies, Hangs], ids=["thread died", "thread stuck"])
def test_a_worker_without_live_handler_threads_stops_heartbeating_and_exits_3(
    redis: redis_lib.Redis, redis_url: str, make_handler: Callable[[], Any]
) -> None:
    """Alive but not consuming: the worker drops its heartbeat (the reaper frees its
    message at once), reports unhealthy and ``run`` returns 3 for the supervisor."""
    client = redis_lib.Redis.from_url(redis_url)
    q = RedisQueue(client, Q)
    handler = make_handler()
    worker = Worker(q, handler, NoPublisher(), heartbeat_ttl=30, stuck_seconds=1.0)
    thread, code = run_in_thread(worker)
    try:
        wait_for(lambda: client.exists(keys.heartbeat(Q, worker.id)), message="registered")
        q.push(message(7))
        thread.join(15)
        assert code == [EXIT_UNHEALTHY], worker.unhealthy_reason
        why = "died" if make_handler is Dies else "stuck in one message for"
        assert worker.unhealthy_reason.startswith("handler thread "), worker.unhealthy_reason
        assert why in worker.unhealthy_reason
        assert not client.exists(keys.heartbeat(Q, worker.id))
        assert q.reap() == {worker.id: 1}  # at once, not after the 30 s TTL
        assert client.lrange(keys.pending(Q), 0, -1) == [message(7)]
    finally:
        if isinstance(handler, Hangs):
            handler.forever.set()
        client.close()


def test_a_message_that_keeps_killing_workers_is_dead_lettered_alone(
    redis: redis_lib.Redis, redis_url: str
) -> None:
    """Deaths are counted at reap; a suspect is taken alone, so its batch-mates go on
    without it; after ``max_crashes`` deaths it is dead-lettered with the reason."""
    client = redis_lib.Redis.from_url(redis_url)
    q = RedisQueue(client, Q, max_crashes=3)
    poison, a, b = message(1), message(2), message(3)
    q.push(poison, a, b)
    # Registered workers without a heartbeat key: dead, as after a SIGKILL and the TTL.
    client.sadd(keys.workers(Q), "w0")
    assert q.take("w0", 10, 0) == [poison, a, b]
    assert q.reap() == {"w0": 3}
    client.sadd(keys.workers(Q), "w1")
    # Everyone from the dead worker's batch is a suspect now, and comes alone.
    assert q.take("w1", 10, 0) == [poison]
    assert q.take("w2", 10, 0) == [a]
    assert q.take("w2", 10, 0) == [b]
    assert q.ack("w2", [a, b]) == 2  # innocent: handled, forgotten
    for deaths in (2, 3):
        assert q.reap() == {"w1": 1}  # w1 died holding the poison again
        client.sadd(keys.workers(Q), "w1")  # its replacement, with the same fate
        assert int(client.hget(keys.deaths(Q), hashlib.sha1(poison).hexdigest()) or 0) == deaths
        if deaths < 3:
            assert q.take("w1", 10, 0) == [poison]
    assert q.take("w3", 10, 0) == []  # the third death was the last
    [letter] = q.dead_letters()
    assert letter.raw == poison and letter.error == "worker died 3 times handling it"
    assert client.hlen(keys.deaths(Q)) == 0
    assert q.stats()["pending"] == 0 and q.stats()["processed"] == 2
    client.close()


def test_a_suspect_is_not_added_to_a_blocking_takes_batch(
    redis: redis_lib.Redis, redis_url: str
) -> None:
    client = redis_lib.Redis.from_url(redis_url)
    q = RedisQueue(client, Q)
    q.push(message(1))
    client.sadd(keys.workers(Q), "w0")
    q.take("w0", 1, 0)
    assert q.reap() == {"w0": 1}  # message 1 is a suspect now, at the head of pending
    q.push(message(2))
    assert q.take("w1", 10, 1.0) == [message(1)]
    assert q.take("w1", 10, 1.0) == [message(2)]
    client.close()


def test_a_message_back_in_a_live_workers_processing_list_unheld_is_returned(
    redis: redis_lib.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After Redis data loss (an AOF tail dropped, a lagging replica promoted) an acked
    message can reappear in a live worker's processing list, held by no thread; the
    periodic sweep returns it (seen unheld twice) and it is handled, not stuck."""
    from messaging import worker as worker_module

    monkeypatch.setattr(worker_module, "ORPHAN_SWEEP_INTERVAL", 0.2)
    client = redis_lib.Redis.from_url(redis_url)
    q = RedisQueue(client, Q)
    handler = Recorder()
    stop = threading.Event()
    worker = Worker(q, handler, NoPublisher(), stop=stop)
    thread, _code = run_in_thread(worker)
    try:
        wait_for(lambda: client.exists(keys.heartbeat(Q, worker.id)), message="registered")
        client.rpush(keys.processing(Q, worker.id), message(11))  # resurrected, unheld
        wait_for(lambda: handler.handled == [11], 10, message="the orphan handled")
        assert q.stats()["in_flight"] == 0
    finally:
        stop.set()
        thread.join(15)
        client.close()
