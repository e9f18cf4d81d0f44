"""Outcome events recorded in the order history; status, GET and the HTML invoice."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

from messaging import envelope
from orders.history import UnknownOrder, record_event
from orders.models import Order
from tests.orders_app import ADMIN, ORDER

NO_REDIS = "redis://127.0.0.1:1/0"


def _outcome(event_type: str, order_id: int, timestamp: str, **data: Any) -> dict[str, Any]:
    return envelope.envelope(
        event_type,
        {"order_id": order_id, **data},
        message=f"{event_type} for order {order_id}",
        sender="test",
        count=order_id,
        timestamp=timestamp,
    )


def _record(app: Flask, event: dict[str, Any]) -> bool:
    with app.extensions["orders"].sessions.begin() as session:
        return record_event(session, event)


def _place(app: Flask, body: dict[str, Any] | None = None) -> int:
    response = app.test_client().post("/orders", json=body or ORDER)
    assert response.status_code == 201
    return int(response.get_json()["id"])


def test_status_follows_the_outcomes_and_duplicates_change_nothing(
    make_app: Callable[..., Flask],
) -> None:
    app = make_app(NO_REDIS)
    order_id = _place(app)
    client = app.test_client()
    email = _outcome(
        envelope.CONFIRMATION_EMAIL_SENT, order_id, "2026-11-28T10:00:03+00:00",
        to="ada@example.com", message_id="m-1",
    )  # fmt: skip
    paid = _outcome(
        envelope.PAYMENT_CAPTURED, order_id, "2026-11-28T10:00:01+00:00",
        payment_id="p-1", amount="25.00", currency="EUR",
    )  # fmt: skip
    invoiced = _outcome(
        envelope.INVOICE_ISSUED, order_id, "2026-11-28T10:00:02Z",
        invoice_number="INV-2026-000001", total="25.00", currency="EUR",
    )  # fmt: skip

    assert _record(app, email) is True
    assert client.get(f"/orders/{order_id}").get_json()["status"] == "processing"
    assert _record(app, email) is False  # redelivered
    assert _record(app, paid) is True
    assert client.get(f"/orders/{order_id}").get_json()["status"] == "processing"
    assert _record(app, invoiced) is True
    body = client.get(f"/orders/{order_id}").get_json()
    assert body["status"] == "completed"
    # In order of occurrence, not of arrival; the duplicate is not there.
    assert [h["type"] for h in body["history"]] == [
        envelope.PAYMENT_CAPTURED,
        envelope.INVOICE_ISSUED,
        envelope.CONFIRMATION_EMAIL_SENT,
    ]
    assert body["history"][1]["occurred_at"] == "2026-11-28T10:00:02.000000+00:00"
    assert body["history"][1]["data"]["invoice_number"] == "INV-2026-000001"


def test_payment_declined(make_app: Callable[..., Flask]) -> None:
    app = make_app(NO_REDIS)
    order_id = _place(app)
    declined = _outcome(
        envelope.PAYMENT_DECLINED, order_id, "2026-11-28T10:00:01+00:00", reason="card expired"
    )
    assert _record(app, declined)
    assert app.test_client().get(f"/orders/{order_id}").get_json()["status"] == "payment_declined"


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"type": envelope.ORDER_PLACED}, ValueError),
        ({"data": {"order_id": 999}}, UnknownOrder),
        ({"data": {"order_id": True}}, ValueError),
        ({"timestamp": "2026-11-28T10:00:00"}, ValueError),
        ({"id": ""}, ValueError),
    ],
)
def test_bad_events_are_rejected(
    make_app: Callable[..., Flask], change: dict[str, Any], error: type[Exception]
) -> None:
    app = make_app(NO_REDIS)
    order_id = _place(app)
    event = {**_outcome(envelope.PAYMENT_DECLINED, order_id, "2026-11-28T10:00:00Z", reason="x")}
    event.update(change)
    with pytest.raises(error):
        _record(app, event)


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
    invoiced = _outcome(
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
