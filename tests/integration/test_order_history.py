"""Outcome events recorded in the order history; status, GET and the HTML invoice."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from sqlalchemy.exc import OperationalError

from messaging import envelope
from orders import lifecycle
from orders.history import UnknownOrder, record_event, record_event_now
from orders.models import Order
from tests.orders_app import ADMIN, ORDER, outcome

NO_REDIS = "redis://127.0.0.1:1/0"


def _record(app: Flask, event: dict[str, Any]) -> bool:
    with app.extensions["orders"].sessions.begin() as session:
        return record_event(session, event)


def _place(app: Flask, body: dict[str, Any] | None = None) -> int:
    response = app.test_client().post("/orders", json=body or ORDER)
    assert response.status_code == 201
    return int(response.get_json()["id"])


DATA: dict[str, dict[str, Any]] = {
    envelope.PAYMENT_CAPTURED: {"payment_id": "p-1", "amount": "25.00", "currency": "EUR"},
    envelope.PAYMENT_DECLINED: {"reason": "card expired", "amount": "25.00", "currency": "EUR"},
    envelope.INVOICE_ISSUED: {
        "invoice_number": "INV-2026-000001",
        "total": "25.00",
        "currency": "EUR",
    },
    envelope.SHIPMENT_BOOKED: {
        "shipment_id": "shp_1",
        "carrier": "SimParcel",
        "tracking_number": "1Z1",
    },
    envelope.CUSTOMER_NOTIFIED: {"step": "received", "message_id": "<order-1.received@x>"},
}
# Events that drive a new order into each state (from placed).
REACH = {
    lifecycle.PLACED: [],
    lifecycle.PAID: [envelope.PAYMENT_CAPTURED],
    lifecycle.INVOICED: [envelope.PAYMENT_CAPTURED, envelope.INVOICE_ISSUED],
    lifecycle.SHIPPED: [envelope.PAYMENT_CAPTURED, envelope.SHIPMENT_BOOKED],
    lifecycle.COMPLETED: [
        envelope.PAYMENT_CAPTURED,
        envelope.INVOICE_ISSUED,
        envelope.SHIPMENT_BOOKED,
    ],
    lifecycle.CANCELLED: [envelope.PAYMENT_DECLINED],
}


def _event(event_type: str, order_id: int, second: int = 1) -> dict[str, Any]:
    return outcome(event_type, order_id, f"2026-11-28T10:00:{second:02d}+00:00", **DATA[event_type])


def _status(app: Flask, order_id: int) -> str:
    return str(app.test_client().get(f"/orders/{order_id}").get_json()["status"])


def test_every_state_event_pair_through_the_database(make_app: Callable[..., Flask]) -> None:
    """record_event applies lifecycle.TRANSITIONS: one order per (state, event) pair."""
    app = make_app(NO_REDIS)
    for (state, event_type), (after, _effect) in lifecycle.TRANSITIONS.items():
        order_id = _place(app)
        for n, earlier in enumerate(REACH[state]):
            assert _record(app, _event(earlier, order_id, n))
        assert _status(app, order_id) == state
        assert _record(app, _event(event_type, order_id, 30)) is True
        assert _status(app, order_id) == after, (state, event_type)


def test_late_duplicate_and_out_of_order_events(make_app: Callable[..., Flask]) -> None:
    app = make_app(NO_REDIS)
    order_id = _place(app)
    client = app.test_client()
    invoiced = _event(envelope.INVOICE_ISSUED, order_id, 2)
    paid = _event(envelope.PAYMENT_CAPTURED, order_id, 1)
    shipped = _event(envelope.SHIPMENT_BOOKED, order_id, 3)
    late_decline = _event(envelope.PAYMENT_DECLINED, order_id, 4)

    assert _record(app, invoiced) is True  # InvoiceIssued before PaymentCaptured
    assert _status(app, order_id) == "invoiced"
    assert _record(app, invoiced) is False  # redelivered: same event id
    assert _record(app, paid) is True  # the late PaymentCaptured
    assert _status(app, order_id) == "invoiced"
    assert _record(app, shipped) is True
    assert _record(app, {**shipped, "id": str(uuid.uuid4())}) is True  # a re-emitted copy
    assert _status(app, order_id) == "completed"
    assert _record(app, late_decline) is True  # recorded, but never un-pays the order
    body = client.get(f"/orders/{order_id}").get_json()
    assert body["status"] == "completed"
    # History in order of occurrence; timeline in order of recording, with effects.
    assert [h["type"] for h in body["history"]] == [
        envelope.PAYMENT_CAPTURED,
        envelope.INVOICE_ISSUED,
        envelope.SHIPMENT_BOOKED,
        envelope.SHIPMENT_BOOKED,
        envelope.PAYMENT_DECLINED,
    ]
    assert body["history"][1]["occurred_at"] == "2026-11-28T10:00:02.000000+00:00"
    assert [(t["type"], t["status"], t["effect"]) for t in body["timeline"]] == [
        (envelope.ORDER_PLACED, "placed", "advanced"),
        (envelope.INVOICE_ISSUED, "invoiced", "advanced"),
        (envelope.PAYMENT_CAPTURED, "invoiced", "unchanged"),
        (envelope.SHIPMENT_BOOKED, "completed", "advanced"),
        (envelope.SHIPMENT_BOOKED, "completed", "unchanged"),
        (envelope.PAYMENT_DECLINED, "completed", "conflict"),
    ]


def test_payment_declined_cancels_the_order(make_app: Callable[..., Flask]) -> None:
    app = make_app(NO_REDIS)
    order_id = _place(app)
    assert _record(app, _event(envelope.PAYMENT_DECLINED, order_id))
    assert _status(app, order_id) == "cancelled"
    # A capture after the cancellation (the gateway answering twice) changes nothing.
    assert _record(app, _event(envelope.PAYMENT_CAPTURED, order_id, 5))
    assert _status(app, order_id) == "cancelled"


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"type": envelope.ORDER_PLACED}, ValueError),
        ({"data": {"order_id": 999}}, UnknownOrder),
        ({"data": {"order_id": True}}, ValueError),
        ({"data": {"order_id": 10**30}}, ValueError),  # not the driver's OverflowError
        ({"timestamp": "2026-11-28T10:00:00"}, ValueError),
        ({"id": ""}, ValueError),
    ],
)
def test_bad_events_are_rejected(
    make_app: Callable[..., Flask], change: dict[str, Any], error: type[Exception]
) -> None:
    app = make_app(NO_REDIS)
    order_id = _place(app)
    event = _event(envelope.PAYMENT_DECLINED, order_id)
    event.update(change)
    with pytest.raises(error):
        _record(app, event)
    with pytest.raises(error):  # orders-updates' driver path: the same verdict
        record_event_now(app.extensions["orders"].engine, event)


def test_invoice_is_html_escaped_and_only_after_invoice_issued(
    make_app: Callable[..., Flask],
) -> None:
    app = make_app(NO_REDIS)
    order_id = _place(app)
    # The API no longer accepts such an address; an order stored before it did may hold one.
    with app.extensions["orders"].sessions.begin() as session:
        session.get(Order, order_id).customer_email = "<script>x</script>@example.com"
    client = app.test_client()
    missing = client.get(f"/orders/{order_id}/invoice")
    assert missing.status_code == 404
    assert missing.content_type == "application/problem+json"
    invoiced = outcome(
        envelope.INVOICE_ISSUED, order_id, "2026-11-28T10:00:02Z",
        invoice_number="INV-2026-000042", total="25.00", currency="EUR",
    )  # fmt: skip
    invoiced["id"] = str(uuid.uuid4())
    assert _record(app, invoiced)
    page = client.get(f"/orders/{order_id}/invoice", headers=ADMIN)
    assert page.status_code == 200
    assert page.mimetype == "text/html"
    assert page.headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert page.headers["X-Frame-Options"] == "DENY"
    html = page.get_data(as_text=True)
    assert "INV-2026-000042" in html and "25.00 EUR" in html and "BOOK-1" in html
    assert "<script>" not in html and "&lt;script&gt;x&lt;/script&gt;@example.com" in html
    public = client.get(f"/orders/{order_id}/invoice").get_data(as_text=True)
    assert "&lt;***@example.com" in public and "script" not in public
    assert client.get("/orders/999/invoice").status_code == 404


def test_two_outcomes_of_one_order_recorded_at_once_both_count(
    make_app: Callable[..., Flask],
) -> None:
    """InvoiceIssued and ShipmentBooked of one order, recorded concurrently (two
    orders-updates workers): the order ends completed, whichever commits first."""
    app = make_app(NO_REDIS)
    orders = [_place(app) for _ in range(20)]
    for order_id in orders:
        assert _record(app, _event(envelope.PAYMENT_CAPTURED, order_id))
    errors: list[BaseException] = []

    def record(event: dict[str, Any], barrier: threading.Barrier) -> None:
        barrier.wait()
        for _ in range(50):  # a writer that lost SQLite's lock retries, as the worker does
            try:
                _record(app, event)
                return
            except OperationalError:
                threading.Event().wait(0.01)
        errors.append(AssertionError(f"could not record {event['type']}"))

    for order_id in orders:
        barrier = threading.Barrier(2)
        threads = [
            threading.Thread(target=record, args=(_event(t, order_id, 2), barrier))
            for t in (envelope.INVOICE_ISSUED, envelope.SHIPMENT_BOOKED)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert not errors
    assert [_status(app, o) for o in orders] == ["completed"] * len(orders)


def test_a_batch_records_what_one_event_at_a_time_records(
    make_app: Callable[..., Flask],
) -> None:
    """record_events (orders-updates' batch path) = record_event applied in turn: the
    same results, statuses, history and timeline, duplicates and bad events included."""
    from sqlalchemy import select

    from orders.history import record_event_now, record_events, record_events_now
    from orders.models import OrderHistory

    app = make_app(NO_REDIS)
    alone = [_place(app) for _ in range(4)]
    batch = [_place(app) for _ in range(4)]
    # orders-updates' driver paths (one transaction each, on the DBAPI cursor)
    alone_now = [_place(app) for _ in range(4)]
    batch_now = [_place(app) for _ in range(4)]
    engine = app.extensions["orders"].engine

    def events(ids: list[int]) -> list[dict[str, Any]]:
        a, b, c, d = ids
        invoiced = _event(envelope.INVOICE_ISSUED, a, 2)
        shipped = _event(envelope.SHIPMENT_BOOKED, c, 3)
        bad_type = {**_event(envelope.PAYMENT_CAPTURED, d, 1), "type": envelope.ORDER_PLACED}
        return [
            invoiced,  # before its PaymentCaptured
            _event(envelope.PAYMENT_CAPTURED, a, 1),
            invoiced,  # the same event again, in the same batch
            _event(envelope.SHIPMENT_BOOKED, a, 3),
            _event(envelope.PAYMENT_DECLINED, b, 1),
            _event(envelope.PAYMENT_CAPTURED, b, 5),  # after the cancellation
            shipped,
            {**shipped, "id": str(uuid.uuid4())},  # a re-emitted copy under a new id
            _event(envelope.PAYMENT_CAPTURED, 999_999, 1),  # no such order
            bad_type,
            _event(envelope.CUSTOMER_NOTIFIED, d, 4),
        ]

    expected: list[Any] = []
    for event in events(alone):
        try:
            expected.append(_record(app, event))
        except (ValueError, UnknownOrder) as exc:
            expected.append(type(exc))
    with app.extensions["orders"].sessions.begin() as session:
        got = record_events(session, events(batch))
    assert [type(r) if isinstance(r, Exception) else r for r in got] == expected
    got_now = record_events_now(engine, events(batch_now))
    assert [type(r) if isinstance(r, Exception) else r for r in got_now] == expected
    one_now: list[Any] = []
    for event in events(alone_now):
        try:
            one_now.append(record_event_now(engine, event))
        except (ValueError, UnknownOrder) as exc:
            one_now.append(type(exc))
    assert one_now == expected
    assert expected.count(True) == 8 and UnknownOrder in expected and ValueError in expected
    with app.extensions["orders"].sessions() as session:
        for one, many in [
            *zip(alone, batch, strict=True),
            *zip(alone, batch_now, strict=True),
            *zip(alone, alone_now, strict=True),
        ]:
            assert session.get(Order, many).status == session.get(Order, one).status
            assert list(
                session.scalars(
                    select(OrderHistory.type)
                    .where(OrderHistory.order_id == many)
                    .order_by(OrderHistory.id)
                )
            ) == list(
                session.scalars(
                    select(OrderHistory.type)
                    .where(OrderHistory.order_id == one)
                    .order_by(OrderHistory.id)
                )
            )
    assert [_status(app, n) for n in batch] == ["completed", "cancelled", "shipped", "placed"]
