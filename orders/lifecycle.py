"""The order state machine: every state, every outcome event, and what it does, in ONE table.

Why a table and not rules spread over handlers: outcome events reach the order service
late, twice and out of order (the invoice and shipping services work in parallel, a
queue redelivers after a crash, reconciliation re-publishes). With every (state, event)
pair written down, each case has one visible answer and a test.

States::

    placed ──PaymentCaptured──> paid ──InvoiceIssued──> invoiced ──ShipmentBooked──> completed
       │                          └────ShipmentBooked──> shipped ───InvoiceIssued──┘
       └──PaymentDeclined──> cancelled

``invoiced`` and ``shipped`` are the two halves of "paid, half fulfilled";
``completed`` needs the invoice AND the shipment. ``completed`` and ``cancelled`` are
final. Rules that make any arrival order safe:

- an InvoiceIssued or ShipmentBooked proves the payment was captured (those services
  only work on PaymentCaptured), so it may arrive before PaymentCaptured and still
  moves ``placed`` forward;
- a duplicate changes nothing;
- no event ever moves an order backwards: the rank of the next state is never lower;
- a contradiction (PaymentDeclined after a capture, a capture of a cancelled order) is
  recorded in the history but changes nothing and shows as ``conflict`` in the timeline;
- CustomerNotified (an email) never changes the status; it is timeline only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from messaging import envelope

PLACED = "placed"
PAID = "paid"
INVOICED = "invoiced"
SHIPPED = "shipped"
COMPLETED = "completed"
CANCELLED = "cancelled"

STATES: tuple[str, ...] = (PLACED, PAID, INVOICED, SHIPPED, COMPLETED, CANCELLED)
"""Every order status, in the order the API documents them."""

FINAL: frozenset[str] = frozenset({COMPLETED, CANCELLED})
"""States no event leaves."""

RANK: dict[str, int] = {PLACED: 0, PAID: 1, INVOICED: 2, SHIPPED: 2, COMPLETED: 3, CANCELLED: 3}
"""How far along a state is; a transition never lowers it."""

OUTCOME_TYPES: tuple[str, ...] = (
    envelope.PAYMENT_CAPTURED,
    envelope.PAYMENT_DECLINED,
    envelope.INVOICE_ISSUED,
    envelope.SHIPMENT_BOOKED,
    envelope.CUSTOMER_NOTIFIED,
)
"""The events the order service records (every type routed to order-updates)."""

Effect = Literal["advanced", "unchanged", "conflict"]
"""What an event did: moved the order on, nothing (duplicate, email), or contradicted it."""

_CAPTURED = envelope.PAYMENT_CAPTURED
_DECLINED = envelope.PAYMENT_DECLINED
_INVOICE = envelope.INVOICE_ISSUED
_SHIPMENT = envelope.SHIPMENT_BOOKED
_NOTIFIED = envelope.CUSTOMER_NOTIFIED

TRANSITIONS: dict[tuple[str, str], tuple[str, Effect]] = {
    (PLACED, _CAPTURED): (PAID, "advanced"),
    (PLACED, _DECLINED): (CANCELLED, "advanced"),
    (PLACED, _INVOICE): (INVOICED, "advanced"),  # arrived before PaymentCaptured
    (PLACED, _SHIPMENT): (SHIPPED, "advanced"),  # arrived before PaymentCaptured
    (PLACED, _NOTIFIED): (PLACED, "unchanged"),
    (PAID, _CAPTURED): (PAID, "unchanged"),
    (PAID, _DECLINED): (PAID, "conflict"),
    (PAID, _INVOICE): (INVOICED, "advanced"),
    (PAID, _SHIPMENT): (SHIPPED, "advanced"),
    (PAID, _NOTIFIED): (PAID, "unchanged"),
    (INVOICED, _CAPTURED): (INVOICED, "unchanged"),  # the late PaymentCaptured
    (INVOICED, _DECLINED): (INVOICED, "conflict"),
    (INVOICED, _INVOICE): (INVOICED, "unchanged"),
    (INVOICED, _SHIPMENT): (COMPLETED, "advanced"),
    (INVOICED, _NOTIFIED): (INVOICED, "unchanged"),
    (SHIPPED, _CAPTURED): (SHIPPED, "unchanged"),
    (SHIPPED, _DECLINED): (SHIPPED, "conflict"),
    (SHIPPED, _INVOICE): (COMPLETED, "advanced"),
    (SHIPPED, _SHIPMENT): (SHIPPED, "unchanged"),
    (SHIPPED, _NOTIFIED): (SHIPPED, "unchanged"),
    (COMPLETED, _CAPTURED): (COMPLETED, "unchanged"),
    (COMPLETED, _DECLINED): (COMPLETED, "conflict"),
    (COMPLETED, _INVOICE): (COMPLETED, "unchanged"),
    (COMPLETED, _SHIPMENT): (COMPLETED, "unchanged"),
    (COMPLETED, _NOTIFIED): (COMPLETED, "unchanged"),
    (CANCELLED, _CAPTURED): (CANCELLED, "conflict"),
    (CANCELLED, _DECLINED): (CANCELLED, "unchanged"),
    (CANCELLED, _INVOICE): (CANCELLED, "conflict"),
    (CANCELLED, _SHIPMENT): (CANCELLED, "conflict"),
    (CANCELLED, _NOTIFIED): (CANCELLED, "unchanged"),
}
"""(state, outcome event type) -> (next state, effect), for every pair."""


def step(state: str, event_type: str) -> tuple[str, Effect]:
    """The next state and the effect of ``event_type`` on an order in ``state``.

    Raises:
        ValueError: an unknown state or a type that is not an outcome.
    """
    try:
        return TRANSITIONS[(state, event_type)]
    except KeyError:
        raise ValueError(f"no transition for {event_type!r} in state {state!r}") from None


def replay(types: Iterable[str], start: str = PLACED) -> str:
    """The state after recording ``types`` in this order, starting from ``start``."""
    state = start
    for event_type in types:
        state, _effect = step(state, event_type)
    return state


@dataclass(frozen=True)
class Entry:
    """One line of an order's timeline: an event as recorded and what it did."""

    event_type: str
    status: str
    """The order's status after this event."""
    effect: Effect


def timeline(types: Iterable[str]) -> list[Entry]:
    """Each recorded type (in recording order) with the status it left and its effect."""
    state = PLACED
    entries = []
    for event_type in types:
        state, effect = step(state, event_type)
        entries.append(Entry(event_type, state, effect))
    return entries


NOTIFIED_STEPS: dict[str, frozenset[str]] = {
    COMPLETED: frozenset({"received", "shipped"}),
    CANCELLED: frozenset({"received", "payment_declined"}),
}
"""The CustomerNotified steps a settled order has in each final state."""


def settled(status: str, notified_steps: Iterable[str]) -> bool:
    """True when nothing more is owed: a final state and every email of that path sent."""
    return status in FINAL and NOTIFIED_STEPS[status] <= set(notified_steps)
