"""One effect per order and step, enforced by each service's own data, on SQLite and
PostgreSQL: a payment per order (not per event id), and one confirmation email per
order even with two email workers racing on duplicates."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from consumers import store
from consumers.payment import PaymentHandler, SimulatedGateway
from messaging import envelope


def order_placed(order_id: int) -> dict[str, Any]:
    """A new event (new id) for the order every call: a re-publish, a replay."""
    return envelope.envelope(
        envelope.ORDER_PLACED,
        {
            "order_id": order_id,
            "customer_email": "ann@example.com",
            "currency": "EUR",
            "lines": [{"sku": "A", "quantity": 1, "unit_price": "4.00", "line_total": "4.00"}],
            "total": "4.00",
        },
        message=f"Order #{order_id} placed",
        sender="orders-api",
        count=order_id,
    )


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = store.make_engine(database_url)
    for service in store.SERVICE_TABLES:
        store.create_tables(engine, service)
    yield engine
    engine.dispose()


def count(engine: Engine, model: Any) -> int:
    with Session(engine) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_an_order_placed_again_under_a_new_event_id_is_not_charged_twice(engine: Engine) -> None:
    handler = PaymentHandler(engine, SimulatedGateway(engine))
    first, again = order_placed(7), order_placed(7)
    assert first["id"] != again["id"]
    [paid] = handler.handle(first)
    [same] = handler.handle(again)
    assert same == paid  # the stored outcome, same outcome event id
    assert count(engine, store.GatewayCharge) == 1
    assert count(engine, store.Payment) == 1


def test_two_workers_racing_on_two_events_of_one_order_charge_it_once(engine: Engine) -> None:
    handler = PaymentHandler(engine, SimulatedGateway(engine, latency_ms=50))
    events = [order_placed(8) for _ in range(4)]
    start = threading.Barrier(len(events))
    results: list[list[dict[str, Any]]] = []

    def pay(event: dict[str, Any]) -> None:
        start.wait()
        results.append(handler.handle(event))

    threads = [threading.Thread(target=pay, args=(e,)) for e in events]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == 4
    assert len({r[0]["id"] for r in results}) == 1  # one outcome event for the order
    assert count(engine, store.GatewayCharge) == 1
    assert count(engine, store.Payment) == 1
