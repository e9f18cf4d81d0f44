"""Hostile field values are the same 422 on SQLite and on PostgreSQL (issue 14, item 3).

On main before the fix a lone surrogate was a 500 on both databases (the request hash
could not encode it), NUL and a 64-character SKU plus ``"\\n"`` were 500s on PostgreSQL
(it refuses NUL in text; the newline made the SKU longer than its column), and SQLite
stored NUL and ESC bytes that went on to SMTP. Each case here must be a 422 problem
naming the field, with exactly the body that validation alone produces (so the database
behind it cannot change the answer), and must store nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import redis as redis_lib
from flask import Flask

from orders import validation
from orders.models import Order
from tests.orders_app import ADMIN, ORDER, order

LINE = ORDER["items"][0]


def line(**changes: Any) -> dict[str, Any]:
    return {**LINE, **changes}


CASES: list[tuple[str, Any, str]] = [
    ("email lone surrogate", order(customer_email="\ud800@example.com"), "customer_email"),
    ("email NUL", order(customer_email="ada\x00@example.com"), "customer_email"),
    ("email ESC", order(customer_email="\x1b[2Jada@example.com"), "customer_email"),
    ("email newline", order(customer_email="ada@example.com\n"), "customer_email"),
    ("email too long", order(customer_email="a" * 250 + "@example.com"), "customer_email"),
    ("sku 64 + newline", order(items=[line(sku="S" * 64 + "\n")]), "items[0].sku"),
    ("sku NUL", order(items=[line(sku="BOOK\x00")]), "items[0].sku"),
    ("sku lone surrogate", order(items=[line(sku="BOOK\udc00")]), "items[0].sku"),
    ("sku too long", order(items=[line(sku="S" * 65)]), "items[0].sku"),
    ("price newline", order(items=[line(unit_price="12\n")]), "items[0].unit_price"),
    ("price NUL", order(items=[line(unit_price="1\x002")]), "items[0].unit_price"),
    ("currency NUL", order(currency="EU\x00"), "currency"),
    ("field name NUL", {**ORDER, "x\x00": "y"}, "x\x00"),
    ("field name surrogate", {**ORDER, "\udbff": "y"}, "\udbff"),
]


@pytest.mark.parametrize(("case", "body", "field"), CASES, ids=[c[0] for c in CASES])
def test_hostile_fields_are_the_same_422_on_every_database(
    make_app: Callable[..., Flask],
    redis: redis_lib.Redis,
    redis_url: str,
    case: str,
    body: Any,
    field: str,
) -> None:
    app = make_app(redis_url)
    client = app.test_client()
    data = json.dumps(body)  # ASCII with \\u escapes: the surrogates travel as JSON allows
    response = client.post("/orders", data=data, content_type="application/json")
    assert response.status_code == 422, (case, response.get_data(as_text=True))
    assert response.content_type == validation.PROBLEM_CONTENT_TYPE
    problem = response.get_json()
    assert field in [e["field"] for e in problem["errors"]]
    with pytest.raises(validation.Problem) as expected:
        validation.validate_order(json.loads(data))
    assert problem == json.loads(json.dumps(expected.value.to_dict()))
    with app.extensions["orders"].sessions() as session:
        assert session.query(Order).count() == 0


def test_a_valid_order_still_goes_through_on_every_database(
    make_app: Callable[..., Flask], redis: redis_lib.Redis, redis_url: str
) -> None:
    response = make_app(redis_url).test_client().post("/orders", json=ORDER)
    assert response.status_code == 201


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/orders/2147483648", 404),  # one past PostgreSQL's INTEGER: a 500 there on main
        ("/orders/9223372036854775807", 404),
        ("/orders/2147483648/invoice", 404),
        ("/orders?cursor=2147483648", 400),
        ("/orders?cursor=999999999999999999", 400),
    ],
)
def test_ids_past_the_column_are_the_same_answer_on_every_database(
    make_app: Callable[..., Flask], redis: redis_lib.Redis, redis_url: str, path: str, status: int
) -> None:
    response = make_app(redis_url).test_client().get(path, headers=ADMIN)
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.content_type == validation.PROBLEM_CONTENT_TYPE
