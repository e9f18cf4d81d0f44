"""Stuck orders (orders.stuck): the dashboard's ``/api/orders/stuck`` and ``orders-admin stuck``.

An order is stuck when it is not settled and no step was recorded for the threshold:
placed and never paid, paid and never invoiced, completed without its last email. An
order still moving, or settled, is not listed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from flask import Flask
from sqlalchemy import update

from messaging import envelope
from orders import lifecycle
from orders.history import record_event
from orders.models import Order, utc_now
from orders.stuck import stuck_orders
from tests.orders_app import ADMIN, ORDER, outcome

NO_REDIS = "redis://127.0.0.1:1/0"


def _place(app: Flask) -> int:
    response = app.test_client().post("/orders", json=ORDER)
    assert response.status_code == 201
    return int(response.get_json()["id"])


def _age(app: Flask, order_id: int, seconds: float) -> None:
    """Pretend the order was placed ``seconds`` ago."""
    with app.extensions["orders"].sessions.begin() as session:
        session.execute(
            update(Order)
            .where(Order.id == order_id)
            .values(created_at=utc_now() - timedelta(seconds=seconds))
        )


def _record(app: Flask, order_id: int, event_type: str, ago: float, **data: Any) -> None:
    stamp = (utc_now() - timedelta(seconds=ago)).isoformat()
    event = outcome(event_type, order_id, stamp, **data)
    with app.extensions["orders"].sessions.begin() as session:
        record_event(session, event)


def _complete(app: Flask, order_id: int, ago: float, emails: tuple[str, ...]) -> None:
    _record(app, order_id, envelope.PAYMENT_CAPTURED, ago, payment_id="p", amount="25.00",
            currency="EUR")  # fmt: skip
    _record(app, order_id, envelope.INVOICE_ISSUED, ago, invoice_number="INV-1", total="25.00",
            currency="EUR")  # fmt: skip
    _record(app, order_id, envelope.SHIPMENT_BOOKED, ago, shipment_id="s", carrier="c",
            tracking_number="t")  # fmt: skip
    for step in emails:
        _record(app, order_id, envelope.CUSTOMER_NOTIFIED, ago, step=step, message_id=f"<{step}>")


def test_lists_idle_unsettled_orders_with_state_age_and_what_they_wait_for(
    make_app: Callable[..., Flask],
) -> None:
    app = make_app(NO_REDIS)
    never_paid = _place(app)
    _age(app, never_paid, 120)
    paid_only = _place(app)
    _age(app, paid_only, 300)
    _record(app, paid_only, envelope.PAYMENT_CAPTURED, 200, payment_id="p", amount="25.00",
            currency="EUR")  # fmt: skip
    moving = _place(app)  # placed long ago, but its last step was just now
    _age(app, moving, 600)
    _record(app, moving, envelope.PAYMENT_CAPTURED, 1, payment_id="p", amount="25.00",
            currency="EUR")  # fmt: skip
    fresh = _place(app)  # placed a moment ago: not stuck yet
    no_last_email = _place(app)
    _age(app, no_last_email, 100)
    _complete(app, no_last_email, 90, emails=("received",))
    settled = _place(app)
    _age(app, settled, 100)
    _complete(app, settled, 90, emails=("received", "shipped"))

    with app.extensions["orders"].sessions() as session:
        report = stuck_orders(session, 30)
    by_id = {o.order_id: o for o in report.orders}
    assert sorted(by_id) == [never_paid, paid_only, no_last_email]
    assert report.total == 3
    assert fresh not in by_id and moving not in by_id and settled not in by_id
    assert by_id[never_paid].status == lifecycle.PLACED
    assert by_id[never_paid].waiting_for == "payment"
    assert 115 < by_id[never_paid].age_seconds < 200
    assert by_id[paid_only].status == lifecycle.PAID
    assert by_id[paid_only].waiting_for == "invoice and shipment"
    assert 295 < by_id[paid_only].age_seconds and 195 < by_id[paid_only].idle_seconds < 290
    assert by_id[no_last_email].status == lifecycle.COMPLETED
    assert by_id[no_last_email].waiting_for == "email shipped"

    # The dashboard's endpoint: the operator's, the same list, a bad threshold is a 400.
    client = app.test_client()
    assert client.get("/api/orders/stuck").status_code == 401
    body = client.get("/api/orders/stuck", headers=ADMIN).get_json()
    assert body["older_than_seconds"] == 30 and body["pattern"] == "both"
    assert [o["id"] for o in body["orders"]] == [never_paid, paid_only, no_last_email]
    assert body["orders"][0]["status"] == "placed" and body["orders"][0]["waiting_for"] == "payment"
    wide = client.get("/api/orders/stuck?older_than=250", headers=ADMIN).get_json()
    assert [o["id"] for o in wide["orders"]] == []  # paid_only's last step was 200 s ago
    older = client.get("/api/orders/stuck?older_than=110", headers=ADMIN).get_json()
    assert [o["id"] for o in older["orders"]] == [never_paid, paid_only]
    for bad in ("x", "-1", "nan", "90000"):
        response = client.get(f"/api/orders/stuck?older_than={bad}", headers=ADMIN)
        assert response.status_code == 400, bad
        assert response.mimetype == "application/problem+json"
        assert response.get_json()["errors"][0]["field"] == "older_than"


def test_orders_admin_stuck_prints_them(make_app: Callable[..., Flask], database_url: str) -> None:
    app = make_app(NO_REDIS)
    env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": NO_REDIS}

    def admin(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ops.admin", "stuck", *args],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    empty = admin()
    assert empty.returncode == 0, empty.stderr
    assert empty.stdout.startswith("no stuck orders (none idle for more than 30 s)")
    order_id = _place(app)
    _age(app, order_id, 75)
    listed = admin()
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0] == "1 stuck order(s): not settled, no step for more than 30 s"
    assert lines[1].split() == ["order", "status", "age", "idle", "waiting", "for"]
    assert lines[2].split()[:2] == [f"#{order_id}", "placed"] and lines[2].endswith("payment")
    assert "no stuck orders" in admin("--older-than", "600").stdout
    bad = admin("--older-than", "-5")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--older-than" in bad.stderr


def test_the_dashboard_says_what_pattern_means_for_stuck_orders_and_the_feed(
    make_app: Callable[..., Flask],
) -> None:
    """The page renders the panel; its notes name what PATTERN does (server-rendered)."""
    notes = {
        "pubsub": ("PATTERN=pubsub</code> the consumers read the", "very messages the consumers"),
        "queue": ("moves on by itself", "shows what the order service records"),
        "both": ("moves on by itself", None),
    }
    for pattern, (stuck_note, feed_note) in notes.items():
        app = make_app(NO_REDIS, pattern, ORDER_STUCK_SECONDS="45")
        page = app.test_client().get("/", headers=ADMIN)
        assert page.status_code == 200
        html = page.get_data(as_text=True)
        assert 'id="stuck-rows"' in html and "Stuck orders" in html
        assert stuck_note in " ".join(html.split()), pattern
        if feed_note is not None:
            assert feed_note in " ".join(html.split()), pattern
        body = app.test_client().get("/api/orders/stuck", headers=ADMIN).get_json()
        assert (body["pattern"], body["older_than_seconds"]) == (pattern, 45)
