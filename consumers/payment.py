"""The payment consumer: charges each order through a simulated gateway.

Outcomes, as a real card gateway has them:

- captured: emits ``PaymentCaptured {order_id, payment_id, amount, currency}``;
- declined (a business answer, never retried): emits
  ``PaymentDeclined {order_id, reason, amount, currency}``: the order is cancelled;
- transient error (timeout, 503): raises :class:`~messaging.queue.RetryableError`, so the
  message is retried with backoff.

Decisions: PAYMENT_DECLINE_RATE and PAYMENT_TRANSIENT_ERROR_RATE give the shares; with
PAYMENT_SEED set they are a pure function of (seed, event id, call number), so a test
can force outcomes. Magic customer emails override the rates: ``decline@example.com``
is always declined, ``flaky@example.com`` fails transiently on the first
PAYMENT_FLAKY_CALLS calls and then succeeds. PAYMENT_LATENCY_MS delays every call.

One charge per order, not per event: the gateway keeps an idempotency ledger keyed
by :func:`payment_key` (the order id; a real gateway's ``Idempotency-Key``) and
committed in its own transaction, as an external system would, so a charge retried
after a crash returns the first answer; and the ``payments`` table has one row per
order (its primary key), written with the processed row. A second OrderPlaced for the
same order under a new event id finds that row and re-emits the stored outcome (same
outcome event id, recorded once by the order service) instead of charging again.

PAYMENT_CRASH_EMAIL (test only, empty = off) names a customer whose charge kills the
process (``os._exit(137)``, as a segfaulting gateway library would): the crash-looping
message of ``make chaos``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Dialect, Engine, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from consumers import store
from consumers.config import ConsumerSettings
from consumers.handler import Order, order_of
from messaging import database, envelope, keys
from messaging.handler import outcome
from messaging.queue import PermanentError, RetryableError

QUEUE = keys.PAYMENT_QUEUE
SENDER = "payment-service"
DECLINE_EMAIL = "decline@example.com"
"""Customer email whose payments are always declined."""
FLAKY_EMAIL = "flaky@example.com"
"""Customer email whose first PAYMENT_FLAKY_CALLS gateway calls fail transiently."""


class GatewayUnavailable(RetryableError):
    """The gateway timed out or answered 5xx; the charge did not happen."""


@dataclass(frozen=True)
class Charge:
    """The gateway's final answer for one idempotency key."""

    status: str
    """'captured' or 'declined'."""
    payment_id: str | None
    amount: str
    currency: str
    reason: str | None


class SimulatedGateway:
    """A card gateway stand-in with an idempotency ledger (table payment_gateway_charges)."""

    def __init__(
        self,
        engine: Engine,
        *,
        decline_rate: float = 0.0,
        transient_error_rate: float = 0.0,
        latency_ms: int = 0,
        seed: str = "",
        flaky_calls: int = 2,
        crash_email: str = "",
    ) -> None:
        self.engine = engine
        self.decline_rate = decline_rate
        self.transient_error_rate = transient_error_rate
        self.latency_ms = latency_ms
        self.seed = seed
        self.flaky_calls = flaky_calls
        self.crash_email = crash_email.lower()

    def _draw(self, *parts: object) -> float:
        """A number in [0, 1): deterministic per parts when seeded, random otherwise."""
        if not self.seed:
            return random.random()
        digest = hashlib.sha256(":".join(map(str, (self.seed, *parts))).encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    def charge(
        self, idempotency_key: str, *, order_id: int, amount: str, currency: str, email: str
    ) -> Charge:
        """Charge once per key. Raises GatewayUnavailable on a simulated transient error."""
        if self.crash_email and email.lower() == self.crash_email:
            print(f"payment: PAYMENT_CRASH_EMAIL {email}: exit 137", file=sys.stderr, flush=True)
            os._exit(137)
        if self.latency_ms:
            threading.Event().wait(self.latency_ms / 1000)
        return self._charge(idempotency_key, order_id, amount, currency, email)

    def _charge(self, key: str, order_id: int, amount: str, currency: str, email: str) -> Charge:
        """One call to the ledger, in one transaction on the driver (:data:`SQL`).

        The upsert counts the call and locks the key's row (SQLite: the transaction
        holds the write lock), so concurrent calls for one key are decided once.
        """
        dialect = self.engine.dialect
        with database.driver_transaction(self.engine) as cursor:
            calls, status, payment_id, first_amount, first_currency, reason = SQL(
                dialect, "call"
            ).first(
                cursor,
                idempotency_key=key,
                order_id=order_id,
                amount=amount,
                currency=currency,
                created_at=store.now(),
            )
            if status is not None:  # the same key again: the first answer
                return Charge(status, payment_id, first_amount, first_currency, reason)
            flaky = email.lower() == FLAKY_EMAIL and calls <= self.flaky_calls
            timeout = flaky or self._draw(key, "transient", calls) < self.transient_error_rate
            if not timeout:
                if email.lower() == DECLINE_EMAIL or self._draw(key, "decline") < self.decline_rate:
                    status, reason = "declined", "card declined by issuer"
                else:
                    status, payment_id = "captured", f"pay_{uuid.uuid4().hex[:24]}"
                SQL(dialect, "decide").execute(
                    cursor, key=key, status=status, payment_id=payment_id, reason=reason
                )
                return Charge(status, payment_id, first_amount, first_currency, reason)
        # The ledger committed the call count (it saw the call); the charge did not happen.
        raise GatewayUnavailable(f"gateway timeout (call {calls})")


_LEDGER = store.GatewayCharge
SQL = database.DriverStatements(
    call=lambda dialect: (
        store.dialect_insert_of(dialect)(_LEDGER)
        .values(
            **database.binds("idempotency_key", "order_id", "amount", "currency", "created_at"),
            calls=1,
        )
        .on_conflict_do_update(
            index_elements=["idempotency_key"], set_={"calls": _LEDGER.calls + 1}
        )
        .returning(
            _LEDGER.calls,
            _LEDGER.status,
            _LEDGER.payment_id,
            _LEDGER.amount,
            _LEDGER.currency,
            _LEDGER.reason,
        )
    ),
    decide=lambda _dialect: (
        update(_LEDGER)
        .where(_LEDGER.idempotency_key == bindparam("key"))
        .values(
            **database.binds("status", "payment_id", "reason"),
        )
    ),
    paid=lambda _dialect: select(store.Payment.order_id).where(
        store.Payment.order_id == bindparam("order_id")
    ),
    pay=lambda _dialect: insert(store.Payment).values(
        **database.binds("order_id", "event_id", "status", "outcome", "paid_at"),
    ),
)
"""The gateway's ledger and the payment record, on the driver (compiled once per dialect)."""


def payment_key(order_id: int) -> str:
    """The gateway idempotency key of an order's payment: one charge per order."""
    return f"order-{order_id}"


class PaymentHandler:
    """Charges each OrderPlaced once and reports PaymentCaptured or PaymentDeclined."""

    queue = QUEUE
    accepts = envelope.accepted_by(QUEUE)

    def __init__(self, engine: Engine, gateway: SimulatedGateway) -> None:
        self.engine = engine
        self.gateway = gateway

    @classmethod
    def from_settings(cls, engine: Engine, settings: ConsumerSettings) -> PaymentHandler:
        """Build with a gateway configured by the PAYMENT_* variables."""
        return cls(
            engine,
            SimulatedGateway(
                engine,
                decline_rate=settings.payment_decline_rate,
                transient_error_rate=settings.payment_transient_error_rate,
                latency_ms=settings.payment_latency_ms,
                seed=settings.payment_seed,
                flaky_calls=settings.payment_flaky_calls,
                crash_email=settings.payment_crash_email,
            ),
        )

    def handle(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """Charge (once per order) and return the outcome event."""
        try:
            order: Order | None = order_of(event)
        except PermanentError:
            order = None  # raised again below, after the look for a stored outcome
        if order is not None and self._unseen(event, order):
            fast = self._charge_new(event, order)
            if fast is not None:
                return fast
        stored = store.lookup(self.engine, QUEUE, event["id"])
        if stored is not None:
            return stored
        order = order_of(event)
        paid = store.order_payment(self.engine, order.order_id)
        if paid is None:
            try:
                return self._charge(event, order)
            except IntegrityError:  # a concurrent event of the same order recorded first
                paid = store.order_payment(self.engine, order.order_id)
                if paid is None:
                    raise
        # The order was paid under another event id: this event gets the same outcome.
        emitted, _new = store.record_outcome(self.engine, QUEUE, event, paid)
        return emitted

    def handle_batch(
        self, events: list[dict[str, Any]], stopping: Callable[[], bool] = bool
    ) -> list[list[dict[str, Any]] | Exception | None]:
        """Charge a taken batch: one gateway call per order, ONE transaction to record them.

        One charge per order holds as in :meth:`handle`: the gateway call is keyed by
        the order (a crash after it and before the record commits makes the
        redelivery's call return the first answer, as for one message), and the
        ``payments`` rows of the batch commit with its processed rows, all or none. A
        gateway timeout is that event's failure (retried); an order already paid
        under another event id, or a second event of one order in the batch, is left
        to :meth:`handle`, which re-emits the stored outcome. Once ``stopping()`` is
        true no further order is charged: what was charged is recorded, the rest is
        returned un-started.
        """
        results: list[list[dict[str, Any]] | Exception | None] = [None] * len(events)
        dialect = self.engine.dialect
        todo: list[tuple[int, dict[str, Any], Order]] = []
        paid: set[int] = set()
        # One read on the driver: which events were handled, which orders are paid.
        with database.driver_transaction(self.engine) as cursor:
            for index, event in enumerate(events):
                found = store.SQL(dialect, "processed").first(
                    cursor, queue=QUEUE, event_id=event["id"]
                )
                if found is not None:
                    results[index] = json.loads(found[0])
                    continue
                try:
                    order = order_of(event)
                except PermanentError as exc:
                    results[index] = exc
                    continue
                todo.append((index, event, order))
                if SQL(dialect, "paid").first(cursor, order_id=order.order_id) is not None:
                    paid.add(order.order_id)
        charged: list[tuple[int, dict[str, Any], list[dict[str, Any]]]] = []
        for n, (index, event, order) in enumerate(todo):
            if n and stopping():  # shutting down: the rest goes back to the queue un-started
                break
            if order.order_id in paid:  # paid under another id, or earlier in this batch
                continue
            paid.add(order.order_id)
            try:
                charged.append((index, event, [self._outcome(order, self._call(order))]))
            except GatewayUnavailable as exc:
                results[index] = exc
        if charged:
            now = datetime.now(UTC)
            with database.driver_transaction(self.engine) as cursor:
                for _, event, result in charged:
                    outcome = json.dumps(result)
                    captured = result[0]["type"] == envelope.PAYMENT_CAPTURED
                    SQL(dialect, "pay").execute(
                        cursor,
                        order_id=event["data"]["order_id"],
                        event_id=event["id"],
                        status="captured" if captured else "declined",
                        outcome=outcome,
                        paid_at=now,
                    )
                    store.record_processed(cursor, dialect, QUEUE, event, result)
            for index, _, result in charged:
                results[index] = result
        return results

    def _call(self, order: Order) -> Charge:
        """The gateway call of the order's payment (keyed by the order: once per order)."""
        return self.gateway.charge(
            payment_key(order.order_id),
            order_id=order.order_id,
            amount=order.total,
            currency=order.currency,
            email=order.customer_email,
        )

    @staticmethod
    def _outcome(order: Order, charge: Charge) -> dict[str, Any]:
        """PaymentCaptured or PaymentDeclined for the gateway's answer."""
        if charge.status == "captured":
            return outcome(
                envelope.PAYMENT_CAPTURED,
                {
                    "order_id": order.order_id,
                    "payment_id": charge.payment_id,
                    "amount": charge.amount,
                    "currency": charge.currency,
                },
                order_id=order.order_id,
                sender=SENDER,
                message=f"Payment captured for order #{order.order_id}",
            )
        return outcome(
            envelope.PAYMENT_DECLINED,
            {
                "order_id": order.order_id,
                "reason": charge.reason or "declined",
                "amount": charge.amount,
                "currency": charge.currency,
            },
            order_id=order.order_id,
            sender=SENDER,
            message=f"Payment declined for order #{order.order_id}",
        )

    def _unseen(self, event: dict[str, Any], order: Order) -> bool:
        """Neither this event handled nor its order paid (one read, on the driver)."""
        dialect = self.engine.dialect
        with database.driver_transaction(self.engine) as cursor:
            return (
                store.SQL(dialect, "processed").first(cursor, queue=QUEUE, event_id=event["id"])
                is None
                and SQL(dialect, "paid").first(cursor, order_id=order.order_id) is None
            )

    def _charge_new(self, event: dict[str, Any], order: Order) -> list[dict[str, Any]] | None:
        """The common case on the driver (:func:`consumers.store.process_new`): charge a
        new order and record it; None when the record found another event first (then
        :meth:`handle`'s full path decides, and the gateway's key returns this answer)."""
        charge = self._call(order)
        result = self._outcome(order, charge)

        def record(cursor: Any, dialect: Dialect) -> list[dict[str, Any]]:
            SQL(dialect, "pay").execute(
                cursor,
                order_id=order.order_id,
                event_id=event["id"],
                status=charge.status,
                outcome=json.dumps([result]),
                paid_at=store.now(),
            )
            return [result]

        return store.process_new(self.engine, QUEUE, event, record)

    def _charge(self, event: dict[str, Any], order: Order) -> list[dict[str, Any]]:
        charge = self._call(order)
        result = self._outcome(order, charge)

        def record(session: Session) -> list[dict[str, Any]]:
            session.add(
                store.Payment(
                    order_id=order.order_id,
                    event_id=event["id"],
                    status=charge.status,
                    outcome=json.dumps([result]),
                )
            )
            return [result]

        emitted, _new = store.process_once(self.engine, QUEUE, event, record)
        return emitted
