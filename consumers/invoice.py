"""The invoice consumer: one invoice per paid order, numbered INV-<year>-<6 digits>, gap-free.

It works on PaymentCaptured (never on OrderPlaced): an order whose payment was declined
is never invoiced. The invoice total is the captured amount.

The number comes from a counter row per year, incremented in the SAME transaction as
the invoice insert: if the insert does not commit, neither does the increment, so no
number is skipped. Concurrent workers serialize on the counter: on SQLite the
transaction starts with BEGIN IMMEDIATE (the database's write lock, see
:func:`consumers.store.make_engine`); on PostgreSQL the counter row is read with
``SELECT ... FOR UPDATE``. ``unique(order_id)`` and ``unique(invoice_number)`` back it up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Dialect, Engine, bindparam, insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from consumers import store
from consumers.handler import currency_field, money_field, order_id_of, stable_event_id
from messaging import database, envelope, keys
from messaging.handler import outcome

QUEUE = keys.INVOICE_QUEUE
SENDER = "invoice-service"


def _counter(session: Session, year: int) -> store.InvoiceCounter:
    """The year's counter row, locked for this transaction (created at 0 if missing)."""
    if session.get_bind().dialect.name == "postgresql":
        # Create without racing a concurrent first invoice of the year.
        session.execute(
            pg_insert(store.InvoiceCounter)
            .values(year=year, last=0)
            .on_conflict_do_nothing(index_elements=["year"])
        )
    counter = session.get(store.InvoiceCounter, year, with_for_update=True)
    if counter is None:  # SQLite: we hold the write lock already
        counter = store.InvoiceCounter(year=year, last=0)
        session.add(counter)
    return counter


def invoice_number(year: int, sequence: int) -> str:
    """INV-2026-000042."""
    return f"INV-{year:04d}-{sequence:06d}"


@dataclass(frozen=True)
class Capture:
    """The fields of a PaymentCaptured event the invoice uses."""

    order_id: int
    amount: str
    currency: str


def capture_of(event: dict[str, Any]) -> Capture:
    """Check a PaymentCaptured event's data; raise PermanentError naming what is wrong."""
    return Capture(order_id_of(event), money_field(event, "amount"), currency_field(event))


class InvoiceHandler:
    """Issues each paid order's invoice once and reports InvoiceIssued."""

    queue = QUEUE
    accepts = envelope.accepted_by(QUEUE)

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def handle(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """Issue (idempotently) and return the outcome event."""
        capture = capture_of(event)
        fast = store.process_new(self.engine, QUEUE, event, _issue_new(event, capture))
        if fast is not None:
            return fast
        emitted, _new = store.process_once(
            self.engine, QUEUE, event, lambda session: _issue(session, event, capture)
        )
        return emitted

    def handle_batch(
        self, events: list[dict[str, Any]], stopping: Callable[[], bool] = bool
    ) -> list[list[dict[str, Any]] | None]:
        """Issue a taken batch's invoices in ONE transaction (one counter lock, one commit).

        Numbers stay gap-free: they are taken from the counter in the same transaction
        that inserts the invoices, all committed or none. An event with bad data is
        left to :meth:`handle` (which dead-letters it). One quick transaction: it
        finishes even when ``stopping`` turns true.
        """
        return store.process_new_batch(
            self.engine, QUEUE, events, store.new_effects(capture_of, _issue_new)
        )


SQL = database.DriverStatements(
    issued=lambda _dialect: select(store.Invoice.id).where(
        store.Invoice.order_id == bindparam("order_id")
    ),
    # The year's next number in one statement that also locks the counter's row (on
    # SQLite the transaction holds the write lock already): gap-free, as _counter.
    next_number=lambda dialect: (
        store.dialect_insert_of(dialect)(store.InvoiceCounter)
        .values(year=bindparam("year"), last=1)
        .on_conflict_do_update(
            index_elements=["year"], set_={"last": store.InvoiceCounter.last + 1}
        )
        .returning(store.InvoiceCounter.last)
    ),
    issue=lambda _dialect: insert(store.Invoice).values(
        **database.binds(
            "order_id", "invoice_number", "event_id", "total", "currency", "issued_at"
        ),
    ),
)


def _issue_new(event: dict[str, Any], capture: Capture) -> store.NewEffect:
    """The fast path's effect (:func:`consumers.store.process_new`): issue a new invoice;
    None when the order has one already (the full path reports that one)."""

    def effect(cursor: Any, dialect: Dialect) -> list[dict[str, Any]] | None:
        order_id = capture.order_id
        if SQL(dialect, "issued").first(cursor, order_id=order_id) is not None:
            return None
        at = store.now()
        (sequence,) = SQL(dialect, "next_number").first(cursor, year=at.year)
        number = invoice_number(at.year, sequence)
        SQL(dialect, "issue").execute(
            cursor,
            order_id=order_id,
            invoice_number=number,
            event_id=event["id"],
            total=capture.amount,
            currency=capture.currency,
            issued_at=at,
        )
        return [_issued(order_id, number, capture.amount, capture.currency, at)]

    return effect


def _issue(session: Session, event: dict[str, Any], capture: Capture) -> list[dict[str, Any]]:
    """Issue the order's invoice in the session's transaction (or find the one it has)."""
    order_id = capture.order_id
    invoice = session.scalars(
        select(store.Invoice).where(store.Invoice.order_id == order_id)
    ).first()
    if invoice is None:  # else: another capture of the same order; one invoice
        year = datetime.now(UTC).year
        counter = _counter(session, year)
        counter.last += 1
        invoice = store.Invoice(
            order_id=order_id,
            invoice_number=invoice_number(year, counter.last),
            event_id=event["id"],
            total=capture.amount,
            currency=capture.currency,
        )
        session.add(invoice)
        session.flush()
    number, total, currency = invoice.invoice_number, invoice.total, invoice.currency
    return [_issued(order_id, number, total, currency, invoice.issued_at)]


def _issued(order_id: int, number: str, total: str, currency: str, at: datetime) -> dict[str, Any]:
    """The InvoiceIssued event of an order's invoice (the same id every time)."""
    return outcome(
        envelope.INVOICE_ISSUED,
        {"order_id": order_id, "invoice_number": number, "total": total, "currency": currency},
        order_id=order_id,
        sender=SENDER,
        message=f"Invoice {number} issued for order #{order_id}",
        event_id=stable_event_id(envelope.INVOICE_ISSUED, order_id),
        at=at,
    )
