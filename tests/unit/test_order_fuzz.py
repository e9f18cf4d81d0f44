"""Property-based fuzzing of POST /orders: never a 5xx, always JSON or problem JSON."""

from __future__ import annotations

import json
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

near_valid_line = st.fixed_dictionaries(
    {
        "sku": st.one_of(st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True), json_values),
        "quantity": st.one_of(st.integers(-5, 1005), st.booleans(), st.floats(), st.text()),
        "unit_price": st.one_of(
            st.decimals(-10, 2_000_000, allow_nan=False).map(str),
            st.sampled_from(["NaN", "Infinity", "-0", "1e3", "0.00", "1000000.00"]),
            st.from_regex(r"[0-9]{1,8}(\.[0-9]{0,4})?", fullmatch=True),
            st.floats(allow_nan=False),
            json_values,
        ),
    },
    optional={"extra": json_values},
)
near_valid_order = st.fixed_dictionaries(
    {
        "customer_email": st.one_of(st.emails(), st.text(max_size=300), json_values),
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
