"""POST /orders validation, money arithmetic and idempotency rules.

The HTTP cases go through the Flask test client of a real app on a SQLite file in
``tmp_path``; rejected requests never reach the database or Redis (no Redis runs).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from orders import money, validation
from tests.orders_app import ADMIN, ORDER, build_app, order

NO_REDIS = "redis://127.0.0.1:1/0"
PROBLEM = "application/problem+json"


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    app = build_app(f"sqlite:///{tmp_path / 'orders.db'}", NO_REDIS, MAX_BODY_BYTES="8192")
    yield app
    app.extensions["orders"].close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def item(**changes: Any) -> dict[str, Any]:
    line: dict[str, Any] = {"sku": "BOOK-1", "quantity": 2, "unit_price": "12.50"}
    line.update(changes)
    return line


def without(field: str) -> dict[str, Any]:
    body = order()
    del body[field]
    return body


def line_without(field: str) -> dict[str, Any]:
    line = item()
    del line[field]
    return order(items=[line])


INVALID: list[tuple[str, Any, str]] = [
    ("body is an array", [ORDER], "body"),
    ("body is a string", "order", "body"),
    ("body is null", None, "body"),
    ("missing customer_email", without("customer_email"), "customer_email"),
    ("missing currency", without("currency"), "currency"),
    ("missing items", without("items"), "items"),
    ("unknown field", order(coupon="FREE"), "coupon"),
    ("unknown line field", order(items=[item(color="red")]), "items[0].color"),
    ("missing sku", line_without("sku"), "items[0].sku"),
    ("missing quantity", line_without("quantity"), "items[0].quantity"),
    ("missing unit_price", line_without("unit_price"), "items[0].unit_price"),
    ("email not a string", order(customer_email=7), "customer_email"),
    ("email without @", order(customer_email="ada.example.com"), "customer_email"),
    ("email without domain dot", order(customer_email="ada@example"), "customer_email"),
    ("email with space", order(customer_email="ada lovelace@example.com"), "customer_email"),
    ("email too long", order(customer_email="a" * 250 + "@x.io"), "customer_email"),
    ("currency lower case", order(currency="eur"), "currency"),
    ("currency unknown", order(currency="XXX"), "currency"),
    ("currency not a string", order(currency=978), "currency"),
    ("items not an array", order(items={"sku": "A"}), "items"),
    ("items empty", order(items=[]), "items"),
    ("too many lines", order(items=[item(sku=f"S{n}") for n in range(101)]), "items"),
    ("line not an object", order(items=["BOOK-1"]), "items[0]"),
    ("quantity zero", order(items=[item(quantity=0)]), "items[0].quantity"),
    ("quantity negative", order(items=[item(quantity=-1)]), "items[0].quantity"),
    ("quantity huge", order(items=[item(quantity=1001)]), "items[0].quantity"),
    ("quantity bool", order(items=[item(quantity=True)]), "items[0].quantity"),
    ("quantity float", order(items=[item(quantity=2.0)]), "items[0].quantity"),
    ("quantity string", order(items=[item(quantity="2")]), "items[0].quantity"),
    ("price a number", order(items=[item(unit_price=12.5)]), "items[0].unit_price"),
    ("price an int", order(items=[item(unit_price=12)]), "items[0].unit_price"),
    ("price 3 decimals", order(items=[item(unit_price="12.505")]), "items[0].unit_price"),
    ("price zero", order(items=[item(unit_price="0.00")]), "items[0].unit_price"),
    ("price negative", order(items=[item(unit_price="-1.00")]), "items[0].unit_price"),
    ("price NaN", order(items=[item(unit_price="NaN")]), "items[0].unit_price"),
    ("price Infinity", order(items=[item(unit_price="Infinity")]), "items[0].unit_price"),
    ("price exponent", order(items=[item(unit_price="1e3")]), "items[0].unit_price"),
    ("price huge", order(items=[item(unit_price="1000000.01")]), "items[0].unit_price"),
    ("price empty", order(items=[item(unit_price="")]), "items[0].unit_price"),
    ("price bool", order(items=[item(unit_price=True)]), "items[0].unit_price"),
    ("sku empty", order(items=[item(sku="")]), "items[0].sku"),
    ("sku too long", order(items=[item(sku="A" * 65)]), "items[0].sku"),
    ("sku with space", order(items=[item(sku="BOOK 1")]), "items[0].sku"),
    ("sku not a string", order(items=[item(sku=1)]), "items[0].sku"),
    ("duplicate sku", order(items=[item(), item(quantity=1)]), "items[1].sku"),
    # Issue 14: one addr-spec only (recipient injection) ...
    ("email list", order(customer_email="root,ada@example.com"), "customer_email"),
    ("email local user", order(customer_email="root"), "customer_email"),
    ("email two", order(customer_email="ada@example.com, spy@evil.example"), "customer_email"),
    ("email display name", order(customer_email="Ada <ada@example.com>"), "customer_email"),
    ("email comment", order(customer_email="ada@example.com (x)"), "customer_email"),
    ("email quoted", order(customer_email='"a,b"@example.com'), "customer_email"),
    ("email ip literal", order(customer_email="ada@[127.0.0.1]"), "customer_email"),
    ("email localhost", order(customer_email="ada@localhost"), "customer_email"),
    (
        "email encoded-word",
        order(customer_email="=?utf-8?q?v0=40evil.example?=,x@example.com"),
        "customer_email",
    ),
    (
        "email encoded-word local part",
        order(customer_email="=?utf-8?q?spy=40evil.example?=@example.com"),
        "customer_email",
    ),
    # ... no final newline ($ matched before it) ...
    ("email final newline", order(customer_email="ada@example.com\n"), "customer_email"),
    ("email header", order(customer_email="ada@example.com\nBcc: x@y.io"), "customer_email"),
    ("sku final newline", order(items=[item(sku="BOOK\n")]), "items[0].sku"),
    ("sku 64 + newline", order(items=[item(sku="A" * 64 + "\n")]), "items[0].sku"),
    ("price final newline", order(items=[item(unit_price="12\n")]), "items[0].unit_price"),
    (
        "duplicate sku with newline",
        order(items=[item(sku="DUP"), item(sku="DUP\n")]),
        "items[1].sku",
    ),
    # ... and nothing the database cannot store the same way on SQLite and PostgreSQL.
    ("email lone surrogate", order(customer_email="\ud800@example.com"), "customer_email"),
    ("email NUL", order(customer_email="ada\x00@example.com"), "customer_email"),
    ("email ESC", order(customer_email="\x1b[31mada@example.com"), "customer_email"),
    ("email DEL", order(customer_email="ada\x7f@example.com"), "customer_email"),
    ("email bidi override", order(customer_email="ada\u202e@example.com"), "customer_email"),
    ("sku NUL", order(items=[item(sku="BOOK\x00")]), "items[0].sku"),
    ("sku lone surrogate", order(items=[item(sku="\udfff")]), "items[0].sku"),
    ("sku ESC", order(items=[item(sku="\x1bBOOK")]), "items[0].sku"),
    ("price NUL", order(items=[item(unit_price="12\x00")]), "items[0].unit_price"),
    ("price arabic digits", order(items=[item(unit_price="\u0661\u0662")]), "items[0].unit_price"),
    ("currency NUL", order(currency="EUR\x00"), "currency"),
    ("currency newline", order(currency="EUR\n"), "currency"),
    ("unknown field NUL", order(**{"\x00": 1}), "\x00"),
    # priority: "standard" or "express", nothing else.
    ("priority unknown", order(priority="urgent"), "priority"),
    ("priority upper case", order(priority="EXPRESS"), "priority"),
    ("priority boolean", order(priority=True), "priority"),
    ("priority null", order(priority=None), "priority"),
    ("unknown field surrogate", order(**{"\ud800": 1}), "\ud800"),
]


@pytest.mark.parametrize(("case", "body", "field"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_orders_are_422_naming_the_field(
    client: FlaskClient, case: str, body: Any, field: str
) -> None:
    response = client.post("/orders", data=json.dumps(body), content_type="application/json")
    assert response.status_code == 422, case
    assert response.content_type == PROBLEM
    problem = response.get_json()
    assert problem["status"] == 422
    assert problem["type"] == validation.PROBLEM_BASE + "validation"
    assert field in [e["field"] for e in problem["errors"]]
    assert client.get("/orders", headers=ADMIN).get_json()["items"] == []


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("ada@example.com", "ada@example.com"),
        ("Ada.Lovelace+shop@Example.COM", "Ada.Lovelace+shop@example.com"),
        ("ada@ex\u00e4mple.com", "ada@xn--exmple-cua.com"),
    ],
)
def test_the_email_is_stored_in_its_ascii_form(
    client: FlaskClient, given: str, stored: str
) -> None:
    response = client.post("/orders", json=order(customer_email=given))
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["customer_email"] == stored


def test_every_error_is_reported_at_once(client: FlaskClient) -> None:
    body = {"customer_email": "x", "currency": "eur", "items": [item(quantity=0, unit_price=1)]}
    fields = [e["field"] for e in client.post("/orders", json=body).get_json()["errors"]]
    assert fields == ["customer_email", "currency", "items[0].quantity", "items[0].unit_price"]


@pytest.mark.parametrize(
    ("data", "content_type", "status", "slug"),
    [
        (b"{not json", "application/json", 400, "malformed-json"),
        (b"", "application/json", 400, "malformed-json"),
        (b'{"a": NaN}', "application/json", 400, "malformed-json"),
        (b'{"a": Infinity}', "application/json", 400, "malformed-json"),
        (b"\xff\xfe", "application/json", 400, "malformed-json"),
        (b"[" * 100_000, "application/json", 413, "payload-too-large"),
        (b"[" * 5000 + b"]" * 5000, "application/json", 413, "payload-too-large"),
        (b"[" * 1000 + b"]" * 1000, "application/json", 400, "malformed-json"),
        (b"{}", "text/plain", 415, "unsupported-media-type"),
        (b"{}", "", 415, "unsupported-media-type"),
        (b"customer_email=a", "application/x-www-form-urlencoded", 415, "unsupported-media-type"),
    ],
)
def test_malformed_requests(
    client: FlaskClient, data: bytes, content_type: str, status: int, slug: str
) -> None:
    response = client.post("/orders", data=data, content_type=content_type)
    assert response.status_code == status
    assert response.content_type == PROBLEM
    assert response.get_json()["type"] == validation.PROBLEM_BASE + slug


@pytest.mark.parametrize(
    ("data", "field", "detail"),
    [
        (
            b'{"customer_email": "ada@example.com", "currency": "EUR", "items": [],'
            b' "customer_email": "eve@example.com"}',
            "customer_email",
            'the name "customer_email" appears twice in one object',
        ),
        (
            b'{"customer_email": "ada@example.com", "currency": "EUR", "items":'
            b' [{"sku": "A-1", "quantity": 1, "unit_price": "1.00", "sku": "B-2"}]}',
            "sku",
            'the name "sku" appears twice in one object',
        ),
        (b'{"items": [{"quantity": ' + b"9" * 5000 + b"}]}", None, "a number has 5000 digits"),
        (b"[" * 1000 + b"]" * 1000, None, "arrays or objects nested too deeply"),
    ],
)
def test_json_that_parses_ambiguously_or_not_at_all_is_400_saying_why(
    client: FlaskClient, data: bytes, field: str | None, detail: str
) -> None:
    """A repeated name would be read as the last value here and the first by others."""
    response = client.post("/orders", data=data, content_type="application/json")
    assert response.status_code == 400
    problem = response.get_json()
    assert problem["type"] == validation.PROBLEM_BASE + "malformed-json"
    assert problem["detail"] == "the body is not accepted JSON: " + detail
    fields = [e["field"] for e in problem.get("errors", [])]
    assert fields == ([field] if field else [])
    assert client.get("/orders", headers=ADMIN).get_json()["items"] == []


def test_body_over_the_limit_is_413(client: FlaskClient) -> None:
    body = order(customer_email="a" * 9000 + "@example.com")
    response = client.post("/orders", json=body)
    assert response.status_code == 413
    assert response.content_type == PROBLEM
    assert "8192 bytes" in response.get_json()["detail"]


@pytest.mark.parametrize(
    ("path", "method", "status"),
    [
        ("/nope", "get", 404),
        ("/orders/42", "get", 404),
        ("/orders/abc", "get", 404),
        ("/orders/99999999999999999999999", "get", 404),
        ("/orders/1", "post", 405),
        ("/orders?limit=0", "get", 400),
        ("/orders?limit=101", "get", 400),
        ("/orders?limit=x", "get", 400),
        ("/orders?cursor=-1", "get", 400),
        ("/orders?cursor=%C2%B2", "get", 400),
        ("/orders?limit=5%0A", "get", 400),
        ("/orders?cursor=1%0A", "get", 400),
    ],
)
def test_http_errors_are_problem_json(
    client: FlaskClient, path: str, method: str, status: int
) -> None:
    response = getattr(client, method)(path, headers=ADMIN)
    assert response.status_code == status
    assert response.content_type == PROBLEM
    assert response.get_json()["status"] == status


def test_unexpected_errors_are_a_generic_500(
    app: Flask, client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    app.extensions["orders"].sessions = None  # any request touching the DB now fails
    response = client.get("/orders/1")
    assert response.status_code == 500
    assert response.content_type == PROBLEM
    assert response.get_json()["detail"] == "an unexpected error occurred"
    assert "Traceback" not in response.get_data(as_text=True)
    assert "Unhandled error" in caplog.text


@pytest.mark.parametrize("key", ["", "a" * 256, "with space", "caf\u00e9"])
def test_bad_idempotency_keys_are_400(client: FlaskClient, key: str) -> None:
    response = client.post("/orders", json=ORDER, headers={"Idempotency-Key": key})
    assert response.status_code == 400
    assert response.get_json()["errors"][0]["field"] == "Idempotency-Key"


# --- idempotency ---------------------------------------------------------------------


def test_same_key_same_body_returns_the_same_order(client: FlaskClient) -> None:
    first = client.post("/orders", json=ORDER, headers={"Idempotency-Key": "k-1"})
    # Same body, other key order and spacing: the canonical hash matches.
    reordered = b'{"items": [{"unit_price": "12.50", "quantity": 2, "sku": "BOOK-1"}],\n'
    reordered += b' "currency": "EUR", "customer_email": "ada@example.com"}'
    again = client.post(
        "/orders", data=reordered, content_type="application/json",
        headers={"Idempotency-Key": "k-1"},
    )  # fmt: skip
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.get_json() == again.get_json()
    assert again.headers["Location"] == first.headers["Location"]
    assert len(client.get("/orders", headers=ADMIN).get_json()["items"]) == 1


def test_same_key_other_body_is_422(client: FlaskClient) -> None:
    assert client.post("/orders", json=ORDER, headers={"Idempotency-Key": "k"}).status_code == 201
    other = client.post("/orders", json=order(currency="USD"), headers={"Idempotency-Key": "k"})
    assert other.status_code == 422
    assert other.content_type == PROBLEM
    assert other.get_json()["title"] == "Idempotency-Key reused with a different body"
    assert len(client.get("/orders", headers=ADMIN).get_json()["items"]) == 1


def test_without_a_key_every_post_is_a_new_order(client: FlaskClient) -> None:
    ids = {client.post("/orders", json=ORDER).get_json()["id"] for _ in range(3)}
    assert len(ids) == 3


def test_request_hash_is_canonical() -> None:
    a = {"x": 1, "y": [{"b": "2", "a": "1"}]}
    b = {"y": [{"a": "1", "b": "2"}], "x": 1}
    assert validation.request_hash(a) == validation.request_hash(b)
    assert validation.request_hash(a) != validation.request_hash({**a, "x": 2})
    # Arrays keep their order: lines in another order are another body.
    assert validation.request_hash([1, 2]) != validation.request_hash([2, 1])


# --- money ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("price", "quantity", "line_total"),
    [
        ("12.50", 2, "25.00"),
        ("0.10", 3, "0.30"),  # 0.1 * 3 is 0.30000000000000004 as floats
        ("0.01", 1000, "10.00"),
        ("1000000.00", 1000, "1000000000.00"),
        ("19.99", 7, "139.93"),
        ("5", 1, "5.00"),
        ("5.5", 1, "5.50"),
    ],
)
def test_line_totals_are_exact(price: str, quantity: int, line_total: str) -> None:
    amount, error = validation.parse_price(price)
    assert error == "" and amount is not None
    assert money.format_money(money.line_total(amount, quantity)) == line_total


def test_rounding_is_half_even_to_the_cent() -> None:
    assert money.quantize(Decimal("0.125")) == Decimal("0.12")
    assert money.quantize(Decimal("0.135")) == Decimal("0.14")
    assert money.format_money(money.order_total([Decimal("0.10")] * 3)) == "0.30"
    assert money.format_money(money.order_total([])) == "0.00"


def test_order_total_in_the_response(client: FlaskClient) -> None:
    body = order(
        items=[item(sku="A", quantity=3, unit_price="0.10"), item(sku="B", unit_price="19.99")]
    )
    response = client.post("/orders", json=body)
    assert response.status_code == 201
    created = response.get_json()
    assert [line["line_total"] for line in created["lines"]] == ["0.30", "39.98"]
    assert created["total"] == "40.28"
    assert created["created_at"].endswith("+00:00")


@pytest.mark.parametrize("priority", ["standard", "express", None])
def test_priority_is_stored_and_shown(client: FlaskClient, priority: str | None) -> None:
    body = order() if priority is None else order(priority=priority)
    response = client.post("/orders", json=body)
    assert response.status_code == 201
    placed = response.get_json()
    assert placed["priority"] == (priority or "standard")
    shown = client.get(f"/orders/{placed['id']}", headers=ADMIN).get_json()
    assert shown["priority"] == (priority or "standard")
