"""Property-based fuzzing of POST /orders: never a 5xx, always JSON or problem JSON.

The strategies mix in what gave 500s or got through on main (issue 14): lone surrogates,
NUL and other control characters, a final newline after a valid value, comma lists and
encoded-words in the email. Whatever is accepted must be exactly what the rules allow.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.orders_app import build_app

NO_REDIS = "redis://127.0.0.1:1/0"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)

# Lone surrogates (Cs), control characters (Cc: NUL, ESC, newline...), format (Cf: bidi).
hostile_char = st.characters(categories=["Cs", "Cc", "Cf"])


def _spoiled(valid: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A valid value with a hostile character put before, inside or after it."""
    return st.tuples(valid, hostile_char, st.integers(0, 100)).map(
        lambda t: t[0][: t[2] % (len(t[0]) + 1)] + t[1] + t[0][t[2] % (len(t[0]) + 1) :]
    )


valid_sku = st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True)
email_lists = st.lists(st.emails(), min_size=2, max_size=4).map(",".join)
encoded_words = st.emails().map(lambda e: "=?utf-8?q?" + e.replace("@", "=40") + "?=@example.com")

near_valid_line = st.fixed_dictionaries(
    {
        "sku": st.one_of(
            valid_sku, _spoiled(valid_sku), valid_sku.map(lambda s: s + "\n"), json_values
        ),
        "quantity": st.one_of(st.integers(-5, 1005), st.booleans(), st.floats(), st.text()),
        "unit_price": st.one_of(
            st.decimals(-10, 2_000_000, allow_nan=False).map(str),
            st.sampled_from(["NaN", "Infinity", "-0", "1e3", "0.00", "1000000.00"]),
            st.from_regex(r"[0-9]{1,8}(\.[0-9]{0,4})?", fullmatch=True),
            _spoiled(st.sampled_from(["12", "12.50", "1"])),
            st.floats(allow_nan=False),
            json_values,
        ),
    },
    optional={"extra": json_values},
)
near_valid_order = st.fixed_dictionaries(
    {
        "customer_email": st.one_of(
            st.emails(),
            _spoiled(st.emails()),
            email_lists,
            encoded_words,
            st.text(max_size=300),
            json_values,
        ),
        "currency": st.one_of(st.sampled_from(["EUR", "USD", "eur", "XXX", ""]), json_values),
        "items": st.one_of(st.lists(near_valid_line, max_size=5), json_values),
    }
)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flask]:
    path: Path = tmp_path_factory.mktemp("fuzz") / "orders.db"
    app = build_app(f"sqlite:///{path}", NO_REDIS, "pubsub")
    yield app
    app.extensions["orders"].close()


def _check(app: Flask, data: bytes) -> None:
    response = app.test_client().post("/orders", data=data, content_type="application/json")
    assert response.status_code < 500, response.get_data(as_text=True)
    if response.status_code == 201:
        placed = response.get_json()
        email = placed["customer_email"]
        assert email.isascii() and email.isprintable() and email.count("@") == 1, email
        assert "," not in email and "=?" not in email and " " not in email, email
        for line in placed["lines"]:
            assert re.fullmatch(r"[A-Za-z0-9._-]{1,64}", line["sku"]), line
    assert response.content_type in ("application/json", "application/problem+json")
    body: Any = response.get_json()
    assert isinstance(body, dict)
    if response.status_code >= 400:
        assert body["status"] == response.status_code and body["type"] and body["title"]


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=json_values)
def test_arbitrary_json_never_breaks_the_api(app: Flask, body: Any) -> None:
    _check(app, json.dumps(body).encode())


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=near_valid_order)
def test_near_valid_orders_never_break_the_api(app: Flask, body: Any) -> None:
    _check(app, json.dumps(body).encode())


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_never_break_the_api(app: Flask, data: bytes) -> None:
    _check(app, data)


def _with(field: str, value: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "customer_email": "ada@example.com",
        "currency": "EUR",
        "items": [{"sku": "BOOK-1", "quantity": 1, "unit_price": "12.50"}],
    }
    if field in body:
        body[field] = value
    else:
        body["items"][0][field] = value
    return body


one_spoiled_field = st.one_of(
    st.one_of(_spoiled(st.emails()), email_lists, encoded_words).map(
        lambda v: _with("customer_email", v)
    ),
    st.one_of(_spoiled(valid_sku), valid_sku.map(lambda s: s + "\n")).map(
        lambda v: _with("sku", v)
    ),
    _spoiled(st.sampled_from(["12", "12.50"])).map(lambda v: _with("unit_price", v)),
    _spoiled(st.sampled_from(["EUR", "USD"])).map(lambda v: _with("currency", v)),
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=one_spoiled_field)
def test_a_valid_order_with_one_hostile_field_is_refused(app: Flask, body: Any) -> None:
    response = app.test_client().post(
        "/orders", data=json.dumps(body).encode(), content_type="application/json"
    )
    assert response.status_code == 422, response.get_data(as_text=True)
    _check(app, json.dumps(body).encode())
