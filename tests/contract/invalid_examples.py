"""The invalid contract examples: each is a golden example with exactly one rule broken.

Why a table: an invalid example that breaks two rules at once proves nothing about
either (deleting one of them leaves the example rejected, so the test stays green). Each
row below takes one golden file from ``contracts/examples/``, changes one value, and
names the single rule of ``contracts/envelope.schema.json`` that the change breaks. The
rows are written to ``contracts/examples/invalid/<rule>[--<variant>].json``; the Python
and Go tests read those files and check that each fails for exactly the rule in its
name. ``tests/contract/test_contracts.py`` checks that the files on disk are what this
table produces, so a hand edit cannot drift from it. Regenerate after changing a row::

    .venv/bin/python -m tests.contract.invalid_examples

A file name names a rule by the path to its keyword in the schema, with ``.`` between
segments and without the words ``properties`` and ``$defs``: ``id.pattern`` is
``/properties/id/pattern``, ``money.pattern`` is ``/$defs/money/pattern``,
``OrderPlacedV1.lines.items.quantity.minimum`` is
``/$defs/OrderPlacedV1/properties/lines/items/properties/quantity/minimum``.
``required`` takes the missing property (``required.id``), ``dependentRequired`` the
property and the one it needs (``dependentRequired.type.version``); ``ref`` is a
property's ``$ref`` to a shared definition (``PaymentCapturedV1.amount.ref``: the
amount must be money), broken through that property. Anything after
``--`` only tells two examples of the same rule apart (``id.pattern--trailing_newline``).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONTRACTS = Path(__file__).resolve().parents[2] / "contracts"
EXAMPLES = CONTRACTS / "examples"
INVALID = EXAMPLES / "invalid"

DELETE = object()
"""Mutation value meaning: remove the key."""

ARITY = {
    "type": 0,
    "enum": 0,
    "const": 0,
    "pattern": 0,
    "minLength": 0,
    "minimum": 0,
    "minItems": 0,
    "additionalProperties": 0,
    "required": 1,
    "dependentRequired": 2,
    "ref": 0,
}
"""The keywords a file name can end with, and how many arguments follow each. ``ref``
names a ``$ref`` to a shared definition (money, currency, orderId): the rule that
this property is one of those."""


@dataclass(frozen=True)
class Rule:
    """One rule of the schema: a keyword at a JSON pointer, with its arguments.

    Attributes:
        parent: path (list of keys) to the schema object holding the keyword.
        keyword: the keyword, e.g. ``pattern``.
        args: ``[property]`` for required, ``[property, needed]`` for dependentRequired.
    """

    parent: tuple[str, ...]
    keyword: str
    args: tuple[str, ...]

    @property
    def pointer(self) -> str:
        """The keyword's JSON pointer, e.g. ``/$defs/money/pattern``."""
        return "/" + "/".join((*self.parent, self.keyword))


def rule_of(name: str, schema: dict[str, Any]) -> Rule:
    """The rule an invalid example's file name (without ``.json``) names.

    Raises:
        ValueError: the name does not lead to a keyword of the schema.
    """
    parts = name.partition("--")[0].split(".")
    node: Any = schema
    parent: list[str] = []
    for i, part in enumerate(parts):
        rest = parts[i + 1 :]
        keyword = "$ref" if part == "ref" else part
        if keyword in node and ARITY.get(part) == len(rest):
            return Rule(tuple(parent), keyword, tuple(rest))
        in_props = part in node.get("properties", {})
        in_defs = node is schema and part in schema.get("$defs", {})
        if in_props and in_defs:
            raise ValueError(f"{name}: {part!r} is both a property and a $defs name")
        if in_props:
            node, parent = node["properties"][part], [*parent, "properties", part]
        elif in_defs:
            node, parent = schema["$defs"][part], [*parent, "$defs", part]
        elif part == "items" and isinstance(node.get("items"), dict):
            node, parent = node["items"], [*parent, "items"]
        else:
            raise ValueError(f"{name}: no {part!r} under /{'/'.join(parent)}")
    raise ValueError(f"{name}: does not end with a keyword")


@dataclass(frozen=True)
class Case:
    """One invalid example: a golden file with one value changed.

    Attributes:
        name: the file name without ``.json`` (the rule, maybe ``--variant``).
        base: the golden file it starts from.
        path: keys (and list indices) to the changed value; empty for the whole message.
        value: the new value, or DELETE to remove the key.
    """

    name: str
    base: str
    path: tuple[str | int, ...]
    value: Any

    def build(self) -> Any:
        """The invalid message."""
        message = json.loads((EXAMPLES / self.base).read_text())
        if not self.path:
            return self.value
        target = message
        for key in self.path[:-1]:
            target = target[key]
        if self.value is DELETE:
            del target[self.path[-1]]
        else:
            target[self.path[-1]] = copy.deepcopy(self.value)
        return message


HELLO = "hello.json"
PLACED = "order_placed.json"
CAPTURED = "payment_captured.json"
DECLINED = "payment_declined.json"
INVOICED = "invoice_issued.json"
SHIPPED = "shipment_booked.json"
NOTIFIED = "customer_notified.json"
EXPRESS = "order_placed_express.json"


def _event_cases(definition: str, base: str, fields: dict[str, Any]) -> list[Case]:
    """The cases every data definition has: not an object, each required field
    missing, an unknown field."""
    cases = [
        Case(f"{definition}.type", base, ("data",), []),
        Case(f"{definition}.additionalProperties", base, ("data", "note"), "x"),
    ]
    cases += [Case(f"{definition}.required.{f}", base, ("data", f), DELETE) for f in fields]
    return cases


def _string_cases(definition: str, base: str, field: str) -> list[Case]:
    """A non-empty string field: a number, then the empty string."""
    return [
        Case(f"{definition}.{field}.type", base, ("data", field), 1),
        Case(f"{definition}.{field}.minLength", base, ("data", field), ""),
    ]


BREAKS = {"orderId": 0, "currency": "eur", "money": "1.5"}
"""A value that breaks each shared definition (through one rule of it)."""


def _ref_cases(definition: str, base: str, **refs: str) -> list[Case]:
    """Each property that must be a shared definition, given a value that is not."""
    return [
        Case(f"{definition}.{field}.ref", base, ("data", field), BREAKS[target])
        for field, target in refs.items()
    ]


LINE = ("data", "lines", 0)

CASES: list[Case] = [
    # The envelope.
    Case("type", HELLO, (), ["not", "an", "object"]),
    *[Case(f"required.{f}", HELLO, (f,), DELETE) for f in ("id", "timestamp", "message")],
    *[Case(f"required.{f}", HELLO, (f,), DELETE) for f in ("sender", "count")],
    Case("id.type", HELLO, ("id",), 7),
    Case("id.pattern", HELLO, ("id",), "not-a-uuid"),
    Case("id.pattern--trailing_newline", HELLO, ("id",), "7d1c1c1e-8a3f-4a57-9d38-1b5b0e0f4c2a\n"),
    Case("timestamp.type", HELLO, ("timestamp",), 1764324902),
    # The original publisher's datetime.now().isoformat(): local time, no zone.
    Case("timestamp.pattern", HELLO, ("timestamp",), "2026-11-28T10:15:02.123456"),
    Case("timestamp.pattern--trailing_newline", HELLO, ("timestamp",), "2026-11-28T10:15:02Z\n"),
    Case("message.type", HELLO, ("message",), ["Hello"]),
    Case("sender.type", HELLO, ("sender",), 1),
    Case("sender.minLength", HELLO, ("sender",), ""),
    Case("count.type", HELLO, ("count",), "7"),
    Case("count.minimum", HELLO, ("count",), -1),
    # ConfirmationEmailSent was replaced by CustomerNotified: no longer a type.
    Case("type.enum", PLACED, ("type",), "ConfirmationEmailSent"),
    Case("traceparent.type", PLACED, ("traceparent",), 1),
    Case("priority.enum", "order_placed_express.json", ("priority",), "urgent"),
    Case("traceparent.pattern", CAPTURED, ("traceparent",), "4bf92f3577b34da6a3ce929d0e0e4736"),
    Case(
        "traceparent.pattern--upper_case",
        CAPTURED,
        ("traceparent",),
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-1A2B3C4D5E6F7081-01",
    ),
    Case(
        "traceparent.pattern--trailing_newline",
        CAPTURED,
        ("traceparent",),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-1a2b3c4d5e6f7081-01\n",
    ),
    Case("tracestate.type", EXPRESS, ("tracestate",), ["congo=t61rcWkgMzE"]),
    Case(
        "tracestate.pattern", EXPRESS, ("tracestate",), "congo=t61rcWkgMzE, rojo=00f067aa0ba902b7"
    ),
    Case("tracestate.pattern--upper_case_key", EXPRESS, ("tracestate",), "Congo=t61rcWkgMzE"),
    Case("tracestate.pattern--trailing_newline", EXPRESS, ("tracestate",), "congo=t61rcWkgMzE\n"),
    Case("dependentRequired.tracestate.traceparent", EXPRESS, ("traceparent",), DELETE),
    Case("dependentRequired.type.version", PLACED, ("version",), DELETE),
    Case("dependentRequired.type.data", PLACED, ("data",), DELETE),
    Case("dependentRequired.version.type", HELLO, ("version",), 1),
    Case("dependentRequired.data.type", HELLO, ("data",), {}),
    # Each type pins its data version.
    *[
        Case(f"{t}.version.const", base, ("version",), 2)
        for t, base in (
            ("OrderPlaced", PLACED),
            ("PaymentCaptured", CAPTURED),
            ("PaymentDeclined", DECLINED),
            ("InvoiceIssued", INVOICED),
            ("ShipmentBooked", SHIPPED),
            ("CustomerNotified", NOTIFIED),
        )
    ],
    # Shared definitions, each broken once.
    Case("orderId.type", PLACED, ("data", "order_id"), "42"),
    Case("orderId.minimum", PLACED, ("data", "order_id"), 0),
    Case("money.type", PLACED, ("data", "total"), 25.0),
    Case("money.pattern", PLACED, ("data", "total"), "25"),
    Case("money.pattern--three_decimals", CAPTURED, ("data", "amount"), "99.000"),
    Case("money.pattern--trailing_newline", PLACED, ("data", "total"), "25.00\n"),
    Case("currency.type", PLACED, ("data", "currency"), 978),
    Case("currency.pattern", PLACED, ("data", "currency"), "eur"),
    Case("currency.pattern--trailing_newline", INVOICED, ("data", "currency"), "EUR\n"),
    # OrderPlaced.
    *_ref_cases("OrderPlacedV1", PLACED, order_id="orderId", currency="currency", total="money"),
    *[
        Case(f"OrderPlacedV1.lines.items.{f}.ref", PLACED, (*LINE, f), "12.5")
        for f in ("unit_price", "line_total")
    ],
    *_event_cases(
        "OrderPlacedV1",
        PLACED,
        {"order_id": 0, "customer_email": 0, "currency": 0, "lines": 0, "total": 0},
    ),
    Case("OrderPlacedV1.customer_email.type", PLACED, ("data", "customer_email"), None),
    Case("OrderPlacedV1.customer_email.minLength", PLACED, ("data", "customer_email"), "a@"),
    Case("OrderPlacedV1.lines.type", PLACED, ("data", "lines"), {"sku": "BOOK-1"}),
    Case("OrderPlacedV1.lines.minItems", PLACED, ("data", "lines"), []),
    Case("OrderPlacedV1.lines.items.type", PLACED, LINE, "BOOK-1"),
    *[
        Case(f"OrderPlacedV1.lines.items.required.{f}", PLACED, (*LINE, f), DELETE)
        for f in ("sku", "quantity", "unit_price", "line_total")
    ],
    Case("OrderPlacedV1.lines.items.additionalProperties", PLACED, (*LINE, "discount"), "1.00"),
    Case("OrderPlacedV1.lines.items.sku.type", PLACED, (*LINE, "sku"), 1),
    Case("OrderPlacedV1.lines.items.sku.minLength", PLACED, (*LINE, "sku"), ""),
    Case("OrderPlacedV1.lines.items.quantity.type", PLACED, (*LINE, "quantity"), 2.5),
    Case("OrderPlacedV1.lines.items.quantity.minimum", PLACED, (*LINE, "quantity"), 0),
    Case(
        "OrderPlacedV1.priority.enum", "order_placed_express.json", ("data", "priority"), "urgent"
    ),
    # PaymentCaptured.
    *_ref_cases(
        "PaymentCapturedV1", CAPTURED, order_id="orderId", amount="money", currency="currency"
    ),
    *_event_cases(
        "PaymentCapturedV1", CAPTURED, {"order_id": 0, "payment_id": 0, "amount": 0, "currency": 0}
    ),
    *_string_cases("PaymentCapturedV1", CAPTURED, "payment_id"),
    # PaymentDeclined.
    *_ref_cases(
        "PaymentDeclinedV1", DECLINED, order_id="orderId", amount="money", currency="currency"
    ),
    *_event_cases(
        "PaymentDeclinedV1", DECLINED, {"order_id": 0, "reason": 0, "amount": 0, "currency": 0}
    ),
    *_string_cases("PaymentDeclinedV1", DECLINED, "reason"),
    # InvoiceIssued.
    *_ref_cases(
        "InvoiceIssuedV1", INVOICED, order_id="orderId", total="money", currency="currency"
    ),
    *_event_cases(
        "InvoiceIssuedV1", INVOICED, {"order_id": 0, "invoice_number": 0, "total": 0, "currency": 0}
    ),
    Case("InvoiceIssuedV1.invoice_number.type", INVOICED, ("data", "invoice_number"), 43),
    Case("InvoiceIssuedV1.invoice_number.pattern", INVOICED, ("data", "invoice_number"), "INV-43"),
    Case(
        "InvoiceIssuedV1.invoice_number.pattern--trailing_newline",
        INVOICED,
        ("data", "invoice_number"),
        "INV-2026-000043\n",
    ),
    # ShipmentBooked.
    *_ref_cases("ShipmentBookedV1", SHIPPED, order_id="orderId"),
    *_event_cases(
        "ShipmentBookedV1",
        SHIPPED,
        {"order_id": 0, "shipment_id": 0, "carrier": 0, "tracking_number": 0},
    ),
    *_string_cases("ShipmentBookedV1", SHIPPED, "shipment_id"),
    *_string_cases("ShipmentBookedV1", SHIPPED, "carrier"),
    *_string_cases("ShipmentBookedV1", SHIPPED, "tracking_number"),
    # CustomerNotified.
    *_ref_cases("CustomerNotifiedV1", NOTIFIED, order_id="orderId"),
    *_event_cases("CustomerNotifiedV1", NOTIFIED, {"order_id": 0, "step": 0, "message_id": 0}),
    Case("CustomerNotifiedV1.step.enum", NOTIFIED, ("data", "step"), "confirmed"),
    *_string_cases("CustomerNotifiedV1", NOTIFIED, "message_id"),
]


def render(case: Case) -> str:
    """The file text of a case: one line of JSON, as the wire carries it."""
    return json.dumps(case.build(), ensure_ascii=False) + "\n"


def write_all() -> None:
    """Rewrite contracts/examples/invalid/ from CASES (and remove stale files)."""
    INVALID.mkdir(exist_ok=True)
    wanted = {f"{case.name}.json": render(case) for case in CASES}
    for path in INVALID.glob("*.json"):
        if path.name not in wanted:
            path.unlink()
    for name, text in wanted.items():
        (INVALID / name).write_text(text)


if __name__ == "__main__":
    write_all()
