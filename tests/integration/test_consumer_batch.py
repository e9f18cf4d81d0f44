"""A taken batch handled in one transaction: what it must still guarantee.

Real Redis and SQLite, the real Worker and InvoiceHandler, the real EventPublisher.
One batch holds new events, an event delivered twice, an event handled before, one
with bad data and one that is not JSON: every good event gets exactly one invoice
(numbers gap-free) and its outcome once per delivery with the same outcome id; the
bad ones are dead-lettered alone, with their reason; everything is acked or settled.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from sqlalchemy import select
from sqlalchemy.orm import Session

from consumers import store
from consumers.invoice import InvoiceHandler
from messaging import envelope, keys
from messaging.publisher import EventPublisher
from messaging.queue import RedisQueue
from messaging.worker import Worker


def order_placed(order_id: int, **data: Any) -> dict[str, Any]:
    """A PaymentCaptured (what the invoice service works on) for the order."""
    return envelope.envelope(
        envelope.PAYMENT_CAPTURED,
        {"order_id": order_id, "payment_id": "pay_1", "amount": "5.00", "currency": "EUR", **data},
        message=f"order {order_id}",
        sender="test",
        count=order_id,
    )


@pytest.fixture
def bclient(redis: redis_lib.Redis, redis_url: str) -> Iterator[redis_lib.Redis]:
    client = redis_lib.Redis.from_url(redis_url)  # bytes, as the consumers use it
    yield client
    client.close()


def test_one_batch_one_transaction_keeps_every_guarantee(
    bclient: redis_lib.Redis, tmp_path: Path
) -> None:
    engine = store.make_engine(f"sqlite:///{tmp_path / 'invoice.db'}")
    store.create_tables(engine, "invoice")
    handler = InvoiceHandler(engine)
    before = order_placed(1)
    [first_outcome] = handler.handle(before)  # handled before the batch
    twice = order_placed(2)
    bad = order_placed(3, amount="lots")
    batch = [
        envelope.dumps(before),
        envelope.dumps(twice),
        envelope.dumps(order_placed(4)),
        envelope.dumps(twice),
        envelope.dumps(bad),
        "not json",
        envelope.dumps(order_placed(5)),
    ]
    queue = RedisQueue(bclient, "invoice")
    queue.push(*batch)
    worker = Worker(
        queue, handler, EventPublisher(bclient, "queue"), batch_size=len(batch),
        worker_id=f"batch-{uuid.uuid4().hex}",
    )  # fmt: skip
    taken = queue.take(worker.id, len(batch), 1.0)
    assert len(taken) == len(batch)  # one take: the batch path, not one at a time
    done = worker.handle_batch(taken)
    queue.ack(worker.id, done)

    assert len(done) == 5  # all but the bad data and the garbage
    stats = queue.stats()
    assert (stats["processed"], stats["dead_letters"]) == (5, 2)
    assert bclient.llen(keys.processing("invoice", worker.id)) == 0  # all settled
    reasons = [json.loads(d)["error"] for d in bclient.lrange(keys.dead("invoice"), 0, -1)]
    assert any("amount" in r for r in reasons) and len(reasons) == 2
    with Session(engine) as session:
        invoices = {i.order_id: i.invoice_number for i in session.scalars(select(store.Invoice))}
    assert sorted(invoices) == [1, 2, 4, 5]
    assert sorted(int(n[-6:]) for n in invoices.values()) == [1, 2, 3, 4]  # gap-free
    emitted = [json.loads(m) for m in bclient.lrange(keys.pending(keys.ORDER_UPDATES_QUEUE), 0, -1)]
    by_order = Counter(e["data"]["order_id"] for e in emitted)
    assert by_order == {1: 1, 2: 2, 4: 1, 5: 1}  # once per delivery
    assert len({e["id"] for e in emitted if e["data"]["order_id"] == 2}) == 1  # same id
    assert [e["id"] for e in emitted if e["data"]["order_id"] == 1] == [first_outcome["id"]]
    engine.dispose()
