"""The email service's batch path: one claim transaction, one SMTP session per batch.

Real Redis, SQLite, the real Worker and EmailHandler, a real ``smtp-sink`` process.
What a batch must still guarantee: every email once (Message-IDs counted in the sink's
files), the outcome once per delivery with one id, bad data dead-lettered alone with
its reason, a later step before its order's OrderPlaced retried, and an unreachable
SMTP server failing the batch as retries with every claim released. And the crash
window stays one email wide: a worker killed right after the server took a batch's
first email resends that one email (same Message-ID) and no other.
"""

from __future__ import annotations

import email
import json
import uuid
from collections import Counter
from collections.abc import Iterator
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from consumers import store
from consumers.email import EmailHandler
from devtools.redis_server import free_port
from messaging import envelope, faults, keys
from messaging.publisher import EventPublisher
from messaging.queue import RedisQueue
from messaging.worker import Worker
from tests.helpers import BIN, Proc, wait_for


def order_placed(order_id: int, address: str | None = None) -> dict[str, Any]:
    return envelope.envelope(
        envelope.ORDER_PLACED,
        {
            "order_id": order_id,
            "customer_email": address or f"c{order_id}@example.com",
            "currency": "EUR",
            "lines": [{"sku": "S-1", "quantity": 1, "unit_price": "3.50", "line_total": "3.50"}],
            "total": "3.50",
        },
        message=f"Order #{order_id} placed",
        sender="orders-api",
        count=order_id,
    )


def shipment_booked(order_id: int) -> dict[str, Any]:
    return envelope.envelope(
        envelope.SHIPMENT_BOOKED,
        {
            "order_id": order_id,
            "shipment_id": f"shp_{order_id}",
            "carrier": "SimParcel",
            "tracking_number": "1Z0000000000000001",
        },
        message=f"Shipment booked for order #{order_id}",
        sender="shipping-service",
        count=order_id,
    )


@pytest.fixture
def bclient(redis: redis_lib.Redis, redis_url: str) -> Iterator[redis_lib.Redis]:
    client = redis_lib.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """The email service's database: SQLite, then PostgreSQL (both driver fast paths)."""
    engine = store.make_engine(database_url)
    store.create_tables(engine, "email")
    yield engine
    engine.dispose()


def start_sink(tmp_path: Path, port: int, log: str = "sink.log") -> Proc:
    sink = Proc(
        [str(BIN / "smtp-sink")],
        {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(port), "SMTP_SINK_DIR": str(tmp_path / "mail")},
        tmp_path / log,
    )
    sink.wait_output("smtp-sink: listening")
    return sink


def message_ids(tmp_path: Path) -> list[str]:
    return sorted(
        str(email.message_from_bytes(f.read_bytes(), policy=default_policy)["Message-ID"])
        for f in (tmp_path / "mail").glob("*.eml")
    )


def count(engine: Engine, model: Any) -> int:
    with Session(engine) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def emitted(client: redis_lib.Redis) -> list[dict[str, Any]]:
    return [json.loads(m) for m in client.lrange(keys.pending(keys.ORDER_UPDATES_QUEUE), 0, -1)]


def test_one_email_batch_keeps_every_guarantee(
    bclient: redis_lib.Redis, engine: Engine, tmp_path: Path
) -> None:
    port = free_port()
    sink = start_sink(tmp_path, port)
    handler = EmailHandler(engine, host="127.0.0.1", port=port, sender="shop@example.com")
    try:
        before = order_placed(4)
        [first_outcome] = handler.handle(before)  # handled before the batch
        twice = order_placed(3)
        batch = [
            envelope.dumps(order_placed(1)),
            envelope.dumps(order_placed(2)),
            envelope.dumps(twice),
            envelope.dumps(before),
            envelope.dumps(twice),
            envelope.dumps(shipment_booked(1)),  # its OrderPlaced is earlier in the batch
            envelope.dumps(shipment_booked(99)),  # no OrderPlaced seen: retried later
            envelope.dumps(order_placed(5, "two@example.com, three@example.com")),
            "not json",
        ]
        queue = RedisQueue(bclient, "email")
        queue.push(*batch)
        worker = Worker(
            queue, handler, EventPublisher(bclient, "queue"), batch_size=len(batch),
            worker_id=f"batch-{uuid.uuid4().hex}",
        )  # fmt: skip
        taken = queue.take(worker.id, len(batch), 1.0)
        assert len(taken) == len(batch)  # one take: the batch path
        done, unstarted = worker.handle_batch(taken)
        assert unstarted == []
        queue.ack(worker.id, done)
    finally:
        handler.close()
        sink.popen.terminate()
        sink.popen.wait(15)

    assert len(done) == 6  # 1, 2, 3 twice, 4 again, 1 shipped
    stats = queue.stats()
    assert (stats["processed"], stats["dead_letters"], stats["delayed"]) == (6, 2, 1)
    assert bclient.llen(keys.processing("email", worker.id)) == 0  # every one settled
    reasons = [json.loads(d)["error"] for d in bclient.lrange(keys.dead("email"), 0, -1)]
    assert any("refused recipient" in r for r in reasons) and len(reasons) == 2
    assert message_ids(tmp_path) == sorted(
        [f"<order-{n}.received@example.com>" for n in (1, 2, 3, 4)]
        + ["<order-1.shipped@example.com>"]
    )  # each once: order 3 twice in the batch, order 4 before it
    assert count(engine, store.EmailSent) == 5
    with Session(engine) as session:  # every claim recorded as sent; none left sending
        states = Counter(c.state for c in session.scalars(select(store.EmailClaim)))
    assert states == {"sent": 5}
    notified = [e for e in emitted(bclient) if e["type"] == envelope.CUSTOMER_NOTIFIED]
    by_order = Counter((e["data"]["order_id"], e["data"]["step"]) for e in notified)
    assert by_order == {
        (1, "received"): 1, (2, "received"): 1, (3, "received"): 2, (4, "received"): 1,
        (1, "shipped"): 1,
    }  # fmt: skip
    assert len({e["id"] for e in notified if e["data"]["order_id"] == 3}) == 1  # same id
    # order 4's stored outcome, emitted again under its first id
    assert [e["id"] for e in notified if e["data"]["order_id"] == 4] == [first_outcome["id"]]


def test_an_unreachable_smtp_server_fails_the_batch_as_retries_and_frees_every_claim(
    bclient: redis_lib.Redis, engine: Engine
) -> None:
    port = free_port()  # nobody listens: connection refused
    handler = EmailHandler(engine, host="127.0.0.1", port=port, sender="shop@example.com")
    queue = RedisQueue(bclient, "email")
    queue.push(*(envelope.dumps(order_placed(n)) for n in range(1, 6)))
    worker = Worker(
        queue, handler, EventPublisher(bclient, "queue"), batch_size=5,
        worker_id=f"down-{uuid.uuid4().hex}",
    )  # fmt: skip
    taken = queue.take(worker.id, 5, 1.0)
    assert len(taken) == 5
    assert worker.handle_batch(taken) == ([], [])
    stats = queue.stats()
    assert (stats["delayed"], stats["dead_letters"], stats["processed"]) == (5, 0, 0)
    assert bclient.llen(keys.processing("email", worker.id)) == 0
    assert count(engine, store.EmailClaim) == 0  # released: the retries claim at once
    assert count(engine, store.EmailSent) == 0
    assert count(engine, store.Recipient) == 5  # recorded before the first send, kept


def test_a_worker_killed_after_a_batch_first_send_resends_that_email_only(
    bclient: redis_lib.Redis, tmp_path: Path, redis_url: str
) -> None:
    port = free_port()
    sink = start_sink(tmp_path, port)
    db = f"sqlite:///{tmp_path / 'email.db'}"
    env = {
        "REDIS_URL": redis_url,
        "EMAIL_DATABASE_URL": db,
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(port),
        "SMTP_TIMEOUT": "0.5",  # the claim lease is 6 timeouts: 3 s
        "CONSUMER_HEARTBEAT_TTL": "2",
        "CONSUMER_BATCH_SIZE": "3",
        "CONSUMER_BACKOFF_BASE": "0.2",
    }
    queue = RedisQueue(bclient, "email")
    queue.push(*(envelope.dumps(order_placed(n)) for n in (1, 2, 3)))
    armed = Proc(
        [str(BIN / "consumer"), "email"],
        {**env, "FAULT_POINT": "email.after_send:exit"},
        tmp_path / "armed.log",
    )
    clean = None
    try:
        assert armed.popen.wait(60) == faults.EXIT_STATUS, armed.output()
        assert "FAULT_POINT email.after_send: exit" in armed.output()
        assert message_ids(tmp_path) == ["<order-1.received@example.com>"]  # one sent
        clean = Proc([str(BIN / "consumer"), "email"], env, tmp_path / "clean.log")
        wait_for(lambda: queue.stats()["processed"] == 3, timeout=90, message="3 acks")
    finally:
        for proc in (armed, clean):
            if proc is not None:
                proc.kill()
        sink.popen.terminate()
        sink.popen.wait(15)
    ids = message_ids(tmp_path)
    # The one email in the window (taken by the server, not yet recorded) went out
    # again with its Message-ID; the batch's other two, claimed but not sent, once.
    assert Counter(ids) == {
        "<order-1.received@example.com>": 2,
        "<order-2.received@example.com>": 1,
        "<order-3.received@example.com>": 1,
    }
    check = store.make_engine(db)
    try:
        assert count(check, store.EmailSent) == 3
    finally:
        check.dispose()
    assert queue.stats()["dead_letters"] == 0


def test_a_shipped_email_waits_for_its_order_placed_from_another_thread(
    bclient: redis_lib.Redis, engine: Engine, tmp_path: Path
) -> None:
    """With two handler threads (or two email processes) one can take an order's
    ShipmentBooked while the other still holds its OrderPlaced: the shipped email waits
    for the recipient to be recorded (RECIPIENT_WAIT_SECONDS) instead of failing into a
    retry a second later. An order whose OrderPlaced never comes still fails as
    RecipientUnknown, on the batch path and one by one."""
    import threading

    from consumers.email import RecipientUnknown

    port = free_port()
    sink = start_sink(tmp_path, port)
    asked = threading.Event()

    class OtherThreadRecords(EmailHandler):
        def await_recipients(self, order_ids: Any, stopping: Any = bool) -> set[int]:
            asked.set()  # the other thread commits the OrderPlaced while this one waits
            return super().await_recipients(order_ids, stopping)

    handler = OtherThreadRecords(engine, host="127.0.0.1", port=port, sender="shop@example.com")
    received: list[list[dict[str, Any]]] = []

    def other_thread(order_id: int) -> None:
        asked.wait(10)
        received.append(handler.handle(order_placed(order_id)))
        handler.close()

    try:
        thread = threading.Thread(target=other_thread, args=(7,))
        thread.start()
        shipped, never = handler.handle_batch([shipment_booked(7), shipment_booked(8)])
        thread.join(10)
        asked.clear()
        thread = threading.Thread(target=other_thread, args=(9,))
        thread.start()
        [alone] = handler.handle(shipment_booked(9))
        thread.join(10)
        with pytest.raises(RecipientUnknown):
            handler.handle(shipment_booked(10))
    finally:
        handler.close()
        sink.popen.terminate()
        sink.popen.wait(15)
    assert isinstance(shipped, list) and [e["data"]["step"] for e in shipped] == ["shipped"]
    assert isinstance(never, RecipientUnknown)
    assert alone["data"] == {**alone["data"], "order_id": 9, "step": "shipped"}
    assert [[e["data"]["step"] for e in r] for r in received] == [["received"], ["received"]]
    assert message_ids(tmp_path) == sorted(
        f"<order-{n}.{step}@example.com>" for n in (7, 9) for step in ("received", "shipped")
    )
