"""The order state machine: every (state, event) pair, and every arrival order.

Pure functions of :mod:`orders.lifecycle` (no database): the integration tests in
``tests/integration/test_order_history.py`` run the same rules through
``record_event`` on a real database.
"""

from __future__ import annotations

import itertools

import pytest

from messaging import envelope, keys
from orders import lifecycle
from orders.lifecycle import (
    CANCELLED,
    COMPLETED,
    INVOICED,
    PAID,
    PLACED,
    SHIPPED,
    TRANSITIONS,
)

CAPTURED = envelope.PAYMENT_CAPTURED
DECLINED = envelope.PAYMENT_DECLINED
INVOICE = envelope.INVOICE_ISSUED
SHIPMENT = envelope.SHIPMENT_BOOKED
NOTIFIED = envelope.CUSTOMER_NOTIFIED

# The expected answer for every pair, written out independently of the module's table.
EXPECTED = [
    (PLACED, CAPTURED, PAID, "advanced"),
    (PLACED, DECLINED, CANCELLED, "advanced"),
    (PLACED, INVOICE, INVOICED, "advanced"),
    (PLACED, SHIPMENT, SHIPPED, "advanced"),
    (PLACED, NOTIFIED, PLACED, "unchanged"),
    (PAID, CAPTURED, PAID, "unchanged"),
    (PAID, DECLINED, PAID, "conflict"),
    (PAID, INVOICE, INVOICED, "advanced"),
    (PAID, SHIPMENT, SHIPPED, "advanced"),
    (PAID, NOTIFIED, PAID, "unchanged"),
    (INVOICED, CAPTURED, INVOICED, "unchanged"),
    (INVOICED, DECLINED, INVOICED, "conflict"),
    (INVOICED, INVOICE, INVOICED, "unchanged"),
    (INVOICED, SHIPMENT, COMPLETED, "advanced"),
    (INVOICED, NOTIFIED, INVOICED, "unchanged"),
    (SHIPPED, CAPTURED, SHIPPED, "unchanged"),
    (SHIPPED, DECLINED, SHIPPED, "conflict"),
    (SHIPPED, INVOICE, COMPLETED, "advanced"),
    (SHIPPED, SHIPMENT, SHIPPED, "unchanged"),
    (SHIPPED, NOTIFIED, SHIPPED, "unchanged"),
    (COMPLETED, CAPTURED, COMPLETED, "unchanged"),
    (COMPLETED, DECLINED, COMPLETED, "conflict"),
    (COMPLETED, INVOICE, COMPLETED, "unchanged"),
    (COMPLETED, SHIPMENT, COMPLETED, "unchanged"),
    (COMPLETED, NOTIFIED, COMPLETED, "unchanged"),
    (CANCELLED, CAPTURED, CANCELLED, "conflict"),
    (CANCELLED, DECLINED, CANCELLED, "unchanged"),
    (CANCELLED, INVOICE, CANCELLED, "conflict"),
    (CANCELLED, SHIPMENT, CANCELLED, "conflict"),
    (CANCELLED, NOTIFIED, CANCELLED, "unchanged"),
]


@pytest.mark.parametrize(("state", "event_type", "after", "effect"), EXPECTED)
def test_every_pair(state: str, event_type: str, after: str, effect: str) -> None:
    assert lifecycle.step(state, event_type) == (after, effect)


def test_the_table_covers_every_pair_and_nothing_else() -> None:
    pairs = set(itertools.product(lifecycle.STATES, lifecycle.OUTCOME_TYPES))
    assert set(TRANSITIONS) == pairs
    assert {(s, e) for s, e, _a, _f in EXPECTED} == pairs


@pytest.mark.parametrize(("state", "event_type"), sorted(TRANSITIONS))
def test_no_transition_regresses(state: str, event_type: str) -> None:
    after, effect = lifecycle.step(state, event_type)
    assert lifecycle.RANK[after] >= lifecycle.RANK[state]
    assert (after != state) == (effect == "advanced")
    if state in lifecycle.FINAL:
        assert after == state


def test_outcome_types_are_what_order_updates_receives() -> None:
    assert set(lifecycle.OUTCOME_TYPES) == envelope.accepted_by(keys.ORDER_UPDATES_QUEUE)


def test_unknown_pairs_raise() -> None:
    with pytest.raises(ValueError, match="no transition"):
        lifecycle.step("processing", CAPTURED)
    with pytest.raises(ValueError, match="no transition"):
        lifecycle.step(PLACED, envelope.ORDER_PLACED)


# Everything a captured order's history ends with, and a declined one's.
CAPTURED_PATH = [CAPTURED, INVOICE, SHIPMENT, NOTIFIED, NOTIFIED]
DECLINED_PATH = [DECLINED, NOTIFIED, NOTIFIED]


@pytest.mark.parametrize(
    ("path", "final"), [(CAPTURED_PATH, COMPLETED), (DECLINED_PATH, CANCELLED)]
)
def test_every_arrival_order_ends_in_the_same_state(path: list[str], final: str) -> None:
    for order in itertools.permutations(path):
        assert lifecycle.replay(order) == final, order
        # Each event delivered twice, duplicates anywhere after the first.
        assert lifecycle.replay([*order, *reversed(order)]) == final, order


def test_named_late_and_duplicate_cases() -> None:
    # InvoiceIssued recorded before PaymentCaptured.
    assert lifecycle.replay([INVOICE, CAPTURED]) == INVOICED
    # A duplicate ShipmentBooked.
    assert lifecycle.replay([CAPTURED, SHIPMENT, SHIPMENT]) == SHIPPED
    # A PaymentDeclined after a capture (a retried charge that answered differently)
    # is a conflict and never un-pays the order.
    late = lifecycle.timeline([CAPTURED, DECLINED])[-1]
    assert late == lifecycle.Entry(DECLINED, PAID, "conflict")
    # A PaymentDeclined after the gateway's transient errors: simply cancelled.
    assert lifecycle.replay([DECLINED]) == CANCELLED


def test_timeline_lists_status_and_effect() -> None:
    entries = lifecycle.timeline([SHIPMENT, CAPTURED, NOTIFIED, INVOICE])
    assert [(e.status, e.effect) for e in entries] == [
        (SHIPPED, "advanced"),
        (SHIPPED, "unchanged"),
        (SHIPPED, "unchanged"),
        (COMPLETED, "advanced"),
    ]


@pytest.mark.parametrize(
    ("status", "steps", "settled"),
    [
        (COMPLETED, {"received", "shipped"}, True),
        (COMPLETED, {"received"}, False),
        (CANCELLED, {"received", "payment_declined"}, True),
        (CANCELLED, {"payment_declined"}, False),
        (SHIPPED, {"received", "shipped"}, False),
        (PLACED, set(), False),
    ],
)
def test_settled(status: str, steps: set[str], settled: bool) -> None:
    assert lifecycle.settled(status, steps) is settled
