"""The OpenAPI document matches the app: same routes, real responses fit its schemas."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from flask import Flask

from orders import openapi
from tests.orders_app import ADMIN, ORDER, build_app, order

CONTRACT = json.loads(
    (Path(__file__).resolve().parents[2] / "contracts" / "envelope.schema.json").read_text()
)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    app = build_app(f"sqlite:///{tmp_path / 'o.db'}", "redis://127.0.0.1:1/0")
    yield app
    app.extensions["orders"].close()


def _doc(app: Flask) -> dict[str, Any]:
    response = app.test_client().get("/openapi.json")
    assert response.status_code == 200
    return response.get_json()  # type: ignore[no-any-return]


def _validate(doc: dict[str, Any], schema_name: str, value: Any) -> None:
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": doc["components"]}
    jsonschema.Draft202012Validator(schema).validate(value)


def test_every_route_is_documented_and_nothing_else(app: Flask) -> None:
    doc = _doc(app)
    assert doc["openapi"].startswith("3.1")
    routes = {
        (re.sub(r"<(?:int:)?(\w+)>", r"{\1}", rule.rule), method.lower())
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "static"
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert routes == documented


def test_real_responses_fit_the_documented_schemas(app: Flask) -> None:
    doc = _doc(app)
    client = app.test_client()
    _validate(doc, "OrderRequest", ORDER)
    created = client.post("/orders", json=ORDER)
    _validate(doc, "Order", created.get_json())
    assert "201" in doc["paths"]["/orders"]["post"]["responses"]
    _validate(doc, "OrderPage", client.get("/orders", headers=ADMIN).get_json())
    _validate(doc, "Health", client.get("/healthz").get_json())
    invalid = client.post("/orders", json=order(currency="eur"))
    _validate(doc, "Validation", invalid.get_json())
    _validate(doc, "Problem", client.get("/orders/999").get_json())
    stuck = client.get("/api/orders/stuck?older_than=0", headers=ADMIN)
    assert stuck.status_code == 200, stuck.get_data(as_text=True)
    assert stuck.get_json()["total"] >= 1  # the order placed above, not yet paid
    _validate(doc, "StuckOrders", stuck.get_json())
    with pytest.raises(jsonschema.ValidationError):
        _validate(doc, "OrderRequest", order(items=[{"sku": "A", "quantity": 1, "unit_price": 1}]))


def test_money_and_currency_patterns_are_the_contracts() -> None:
    assert openapi.MONEY_PATTERN == CONTRACT["$defs"]["money"]["pattern"]
    assert openapi.CURRENCY_PATTERN == CONTRACT["$defs"]["currency"]["pattern"]
