"""The OrderPlaced event the service builds is the golden example, to the byte."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import jsonschema
import pytest

from messaging import envelope, keys
from messaging.publisher import route
from orders.models import Order, OrderLine
from orders.service import order_placed_event

CONTRACTS = Path(__file__).resolve().parents[2] / "contracts"
SCHEMA = json.loads((CONTRACTS / "envelope.schema.json").read_text())
GOLDEN = json.loads((CONTRACTS / "examples" / "order_placed.json").read_text())


def _golden_order() -> Order:
    return Order(
        id=42,
        customer_email="ada@example.com",
        currency="EUR",
        total=Decimal("25.00"),
        created_at=datetime(2026, 11, 28, 10, 15, 4, tzinfo=UTC),
        lines=[
            OrderLine(
                position=0,
                sku="BOOK-1",
                quantity=2,
                unit_price=Decimal("12.50"),
                line_total=Decimal("25.00"),
            )
        ],
    )


def test_order_placed_equals_the_golden_example() -> None:
    built = order_placed_event(_golden_order())
    jsonschema.Draft202012Validator(SCHEMA).validate(built)
    # Only the event id is new for every event.
    assert built == {**GOLDEN, "id": built["id"]}
    assert built["id"] != GOLDEN["id"]


def test_an_express_order_is_express_in_data_and_envelope() -> None:
    """data.priority is the order's own field; the envelope's is what queues read."""
    order = _golden_order()
    order.priority = "express"
    built = order_placed_event(order)
    jsonschema.Draft202012Validator(SCHEMA).validate(built)
    assert (built["priority"], built["data"]["priority"]) == ("express", "express")
    assert envelope.is_express(envelope.dumps(built))
    assert {k: v for k, v in built.items() if k not in ("id", "priority", "data")} == {
        k: v for k, v in GOLDEN.items() if k not in ("id", "data")
    }
    assert not envelope.is_express(order_placed_event(_golden_order()))


def test_one_item_is_singular() -> None:
    order = _golden_order()
    order.lines[0].quantity = 1
    assert ": 1 item, " in order_placed_event(order)["message"]


@pytest.mark.parametrize(
    ("event_type", "queues"),
    [
        ("OrderPlaced", ["payment", "email"]),
        ("PaymentCaptured", ["invoice", "shipping", "order-updates"]),
        ("PaymentDeclined", ["email", "order-updates"]),
        ("InvoiceIssued", ["order-updates"]),
        ("ShipmentBooked", ["email", "order-updates"]),
        ("CustomerNotified", ["order-updates"]),
    ],
)
def test_routing_by_type_and_pattern(event_type: str, queues: list[str]) -> None:
    """The catalogue (docs/architecture.md): each type to exactly its queues."""
    pending = [f"queue:{{{q}}}:pending" for q in queues]
    assert route(event_type, "both") == ("orders:events", pending)
    assert route(event_type, "queue") == ("", pending)
    assert route(event_type, "pubsub") == ("orders:events", [])


def test_every_consumer_queue_gets_some_event() -> None:
    routed = {q for queues in envelope.ROUTES.values() for q in queues}
    assert routed == {*keys.CONSUMER_QUEUES, keys.ORDER_UPDATES_QUEUE}


def test_route_rejects_an_unknown_type() -> None:
    with pytest.raises(ValueError, match="unknown event type"):
        route("ConfirmationEmailSent", "both")
