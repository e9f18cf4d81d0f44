"""Hostile messages on every consumer queue, through the real worker code and real Redis.

Hypothesis generates garbage: random bytes, invalid UTF-8, JSON of every shape, JSON
nested far deeper than any parser's recursion limit, megabyte payloads, envelopes with
wrong field types, unknown event types and versions. Each batch is pushed onto a
queue (payment, invoice, shipping, email, updates) followed by one valid message; a worker takes
them through :meth:`RedisQueue.take` and :meth:`Worker.handle_one`, as its threads do.

The promises: handling never raises; every message leaves the processing list as
handled, a dead letter or a scheduled retry (nothing stuck, nothing silently dropped);
and the valid message after the garbage is still handled.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers import store
from consumers.__main__ import HANDLERS
from consumers.config import DATABASE_VARS, ConsumerSettings
from devtools.redis_server import free_port
from messaging import envelope, keys
from messaging.queue import RedisQueue
from messaging.worker import Worker
from orders.bootstrap import create_schema
from orders.service import place_order
from orders.updates import UpdatesHandler
from orders.validation import validate_order
from tests.orders_app import ORDER

QUEUES = ["payment", "invoice", "shipping", "email", "updates"]

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=50),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
any_type = st.one_of(json_values, st.sampled_from(["", "OrderPlaced", "PaymentCaptured"]))
envelopes = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.uuids().map(str), any_type),
        "type": st.one_of(
            st.sampled_from(
                [
                    "OrderPlaced",
                    "PaymentCaptured",
                    "PaymentDeclined",
                    "InvoiceIssued",
                    "ShipmentBooked",
                    "CustomerNotified",
                    "ConfirmationEmailSent",
                    "OrderCancelled",
                    "orderplaced",
                    "",
                ]
            ),  # fmt: skip
            any_type,
        ),
        "version": st.one_of(st.integers(-2, 3), any_type),
        "data": st.one_of(
            st.fixed_dictionaries(
                {},
                optional={
                    "order_id": st.one_of(st.integers(-5, 2**64), any_type),
                    "customer_email": any_type,
                    "currency": st.one_of(st.sampled_from(["EUR", "eur", "EURO"]), any_type),
                    "total": st.one_of(st.sampled_from(["1.00", "1e3", "-0.00"]), any_type),
                    "lines": any_type,
                },
            ),
            any_type,
        ),
        "timestamp": any_type,
        "message": any_type,
    },
)


def _deep(n: int) -> bytes:
    return b'{"id":"deep","type":"OrderPlaced","version":1,"data":' + b"[" * n + b"]" * n + b"}"


garbage = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=100).map(lambda b: b"\xff\xfe" + b),  # never UTF-8
    json_values.map(lambda v: json.dumps(v).encode()),
    envelopes.map(lambda v: json.dumps(v).encode()),
    envelopes.map(lambda v: json.dumps(v).encode()[:-1]),  # cut short
    st.integers(1_000, 200_000).map(_deep),
    st.integers(100_000, 3_000_000).map(
        lambda n: b'{"id":"big","type":"OrderPlaced","version":1,"data":{"x":"' + b"A" * n + b'"}}'
    ),
)


class _Publisher:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def publish(self, event: dict[str, Any]) -> None:
        self.events.append(event)


@pytest.fixture
def bclient(redis: redis_lib.Redis, redis_url: str) -> Iterator[redis_lib.Redis]:
    client = redis_lib.Redis.from_url(redis_url)  # bytes, as the consumers use it
    yield client
    client.close()


def _valid(queue: str, order_id: int) -> dict[str, Any]:
    if queue in ("updates", "invoice", "shipping"):
        return envelope.envelope(
            envelope.PAYMENT_CAPTURED,
            {"order_id": order_id, "payment_id": "pay-1", "amount": "25.00", "currency": "EUR"},
            message="Payment captured",
            sender="payment-service",
            count=order_id,
        )
    return envelope.envelope(
        envelope.ORDER_PLACED,
        {
            "order_id": order_id,
            "customer_email": "ada@example.com",
            "currency": "EUR",
            "lines": [
                {"sku": "BOOK-1", "quantity": 2, "unit_price": "12.50", "line_total": "25.00"}
            ],
            "total": "25.00",
        },
        message="Order placed",
        sender="orders-api",
        count=order_id,
    )


@pytest.mark.parametrize("queue", QUEUES)
def test_garbage_on_every_queue_never_crashes_a_worker(
    queue: str, bclient: redis_lib.Redis, tmp_path: Path
) -> None:
    db_url = f"sqlite:///{tmp_path / 'fuzz.db'}"
    consumer_settings = ConsumerSettings.from_env(
        {
            **{var: db_url for var in DATABASE_VARS.values()},
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(free_port()),  # nobody listens: valid emails are retried
            "SMTP_TIMEOUT": "0.5",
        }
    )
    engine = store.make_engine(db_url)
    create_schema(engine)
    for service in store.SERVICE_TABLES:
        store.create_tables(engine, service)
    order = validate_order(ORDER)
    order_id = place_order(engine, order, "hash").order_id
    # One database for the test: each handler only touches its own tables in it.
    handler = (
        UpdatesHandler(engine) if queue == "updates" else HANDLERS[queue](engine, consumer_settings)
    )
    rq = RedisQueue(bclient, keys.ORDER_UPDATES_QUEUE if queue == "updates" else queue)
    worker = Worker(rq, handler, _Publisher(), worker_id=f"fuzz-{uuid.uuid4().hex}")
    processing = keys.processing(rq.name, worker.id)

    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(batch=st.lists(garbage, min_size=1, max_size=4))
    def check(batch: list[bytes]) -> None:
        bclient.delete(rq.pending_key, rq.dead_key, rq.delayed_key, processing)
        valid = json.dumps(_valid(queue, order_id)).encode()
        rq.push(*batch, valid)
        taken = rq.take(worker.id, len(batch) + 1, 0)
        assert len(taken) == len(batch) + 1
        handled = []
        for raw in taken:
            if worker.handle_one(raw):  # must not raise, whatever raw is
                handled.append(raw)
        rq.ack(worker.id, handled)
        assert valid in handled or (queue == "email" and bclient.zcard(rq.delayed_key))
        settled = len(handled) + bclient.llen(rq.dead_key) + bclient.zcard(rq.delayed_key)
        assert bclient.llen(processing) == 0, "a message is stuck in processing"
        assert settled >= len(taken) - _duplicates(taken), "a message vanished"

    try:
        check()
    finally:
        engine.dispose()


def _duplicates(taken: list[bytes]) -> int:
    """Equal messages collapse in the delayed set (a sorted set): count them once."""
    return len(taken) - len(set(taken))
