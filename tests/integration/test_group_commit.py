"""Group commit of the intake (orders.service._GroupCommit), on SQLite and PostgreSQL.

Concurrent requests of one process share one transaction. To make a batch on purpose,
a second connection holds the database's write lock (SQLite: ``BEGIN IMMEDIATE``;
PostgreSQL: ``LOCK TABLE orders IN SHARE MODE``, which every INSERT waits for): the
first order leads and waits for the lock, the next ones queue behind it, and once the
lock is let go they are written by one transaction. Each request must still get its own
outcome: its new order, the order its Idempotency-Key already names, a 422, or the
database's refusal of that order alone.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import IntegrityError

from messaging.database import database_engine
from orders.bootstrap import create_schema
from orders.metrics import COMMIT_BATCH
from orders.models import Order, OrderLine, Outbox
from orders.service import PlaceResult, _group, place_order
from orders.validation import Problem, request_hash, validate_order
from tests.helpers import wait_for
from tests.orders_app import ORDER, order


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """The order service's schema on the test's empty database."""
    found = database_engine(database_url)
    create_schema(found)
    yield found
    found.dispose()


@contextmanager
def write_lock_held(engine: Engine) -> Iterator[None]:
    """Another connection holds the write lock every intake transaction waits for."""
    if engine.dialect.name == "sqlite":
        conn = sqlite3.connect(str(engine.url.database), isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        return
    with engine.connect() as conn:
        conn.execute(text("LOCK TABLE orders IN SHARE MODE"))
        try:
            yield
        finally:
            conn.rollback()


def batches() -> tuple[float, float]:
    """(transactions, orders) the intake's group commit has written in this process."""
    found = {s.name: s.value for metric in COMMIT_BATCH.collect() for s in metric.samples}
    return (
        found["orders_intake_commit_batch_size_count"],
        found["orders_intake_commit_batch_size_sum"],
    )


class Placer:
    """Places orders in threads; each thread's outcome is kept under its name."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.outcomes: dict[str, PlaceResult | BaseException] = {}
        self.threads: list[threading.Thread] = []

    def start(self, name: str, body: dict[str, Any], key: str | None, **change: Any) -> None:
        request = replace(validate_order(body), **change)

        def run() -> None:
            try:
                self.outcomes[name] = place_order(
                    self.engine, request, request_hash(body), key, claim_seconds=30
                )
            except BaseException as exc:  # noqa: BLE001 - the outcome under test
                self.outcomes[name] = exc

        thread = threading.Thread(target=run, name=name)
        thread.start()
        self.threads.append(thread)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(30)
            assert not thread.is_alive(), f"{thread.name} never came back"


def queued(engine: Engine, count: int, placer: Placer) -> None:
    """Wait until ``count`` orders wait behind the leader (its batch is taken)."""
    wait_for(
        lambda: (
            len(_group(engine)._queued) == count or not all(t.is_alive() for t in placer.threads)
        ),
        message=f"{count} orders queued",
    )
    assert len(_group(engine)._queued) == count, placer.outcomes


def created(outcome: PlaceResult | BaseException) -> PlaceResult:
    assert isinstance(outcome, PlaceResult), outcome
    return outcome


def test_concurrent_orders_share_one_transaction_and_each_gets_its_own_answer(
    engine: Engine,
) -> None:
    placer = Placer(engine)
    before = batches()
    with write_lock_held(engine):
        placer.start("leader", ORDER, "lead")
        wait_for(lambda: batches()[0] == before[0] + 1, message="the leader took its batch")
        for name in ("a", "b", "c", "d"):
            placer.start(name, order(customer_email=f"{name}@example.com"), f"key-{name}")
        placer.start("a-retry", order(customer_email="a@example.com"), "key-a")
        placer.start("b-other-body", order(currency="USD"), "key-b")
        placer.start("no-key", ORDER, None)
        queued(engine, 7, placer)
    placer.join()

    assert batches() == (before[0] + 2, before[1] + 8)  # the leader alone, then 7 as one
    new = {name: created(placer.outcomes[name]) for name in ("leader", "c", "d", "no-key")}
    # One key, one body, one batch: one order; the other request answers with it.
    a_pair = [created(placer.outcomes[name]) for name in ("a", "a-retry")]
    assert sorted(result.created for result in a_pair) == [False, True]
    assert a_pair[0].order_id == a_pair[1].order_id
    # One key, two bodies: whichever came first is stored, the other is a 422.
    b_pair = [placer.outcomes[name] for name in ("b", "b-other-body")]
    [stored] = [outcome for outcome in b_pair if isinstance(outcome, PlaceResult)]
    [refused] = [outcome for outcome in b_pair if not isinstance(outcome, PlaceResult)]
    assert stored.created
    assert isinstance(refused, Problem) and refused.status == 422
    new.update(a=next(r for r in a_pair if r.created), b=stored)

    ids = {result.order_id for result in new.values()}
    assert len(ids) == 6
    with engine.connect() as conn:
        assert set(conn.scalars(select(Order.id))) == ids
        assert conn.scalar(select(func.count()).select_from(OrderLine)) == 6
        outbox = {row.id: row for row in conn.execute(select(Outbox))}
    # Each new order answers with its own outbox row, and that row's event is its own.
    for result in new.values():
        assert result.outbox_id is not None and result.payload is not None
        event = json.loads(outbox[result.outbox_id].payload)
        assert event["data"]["order_id"] == result.order_id
        assert outbox[result.outbox_id].payload == result.payload
    assert len(outbox) == 6


def test_an_order_the_database_refuses_fails_only_its_own_request(engine: Engine) -> None:
    placer = Placer(engine)
    before = batches()
    with write_lock_held(engine):
        placer.start("leader", ORDER, "lead")
        wait_for(lambda: batches()[0] == before[0] + 1, message="the leader took its batch")
        placer.start("good-1", ORDER, "good-1")
        placer.start("refused", ORDER, "refused", customer_email=None)  # NOT NULL
        placer.start("good-2", ORDER, None)
        queued(engine, 3, placer)
    placer.join()

    assert batches()[0] >= before[0] + 2
    assert isinstance(placer.outcomes["refused"], IntegrityError), placer.outcomes
    good = [created(placer.outcomes[name]) for name in ("leader", "good-1", "good-2")]
    with engine.connect() as conn:
        assert set(conn.scalars(select(Order.id))) == {result.order_id for result in good}
        assert conn.scalar(select(func.count()).select_from(Outbox)) == 3


def test_an_order_alone_is_written_at_once(engine: Engine) -> None:
    before = batches()
    result = place_order(engine, validate_order(ORDER), request_hash(ORDER), "alone")
    assert result.created
    assert batches() == (before[0] + 1, before[1] + 1)
    assert not _group(engine)._queued
