"""The shipping consumer: books one carrier shipment per paid order.

It works on PaymentCaptured, so a declined order is never shipped. The carrier is
simulated: a booking is a shipment id and a tracking number (``1Z`` + 16 characters,
the shape of a parcel carrier's). A real carrier API would be called where
:func:`book` runs, with the order id as its idempotency key.

Idempotent per order, enforced by the data: ``shipments.order_id`` is unique and the
booking commits with the ``consumer_processed`` row in one transaction. A second
PaymentCaptured for the same order (or a redelivery) finds the shipment and reports it
again under the same event id (:func:`consumers.handler.stable_event_id`); two workers
racing on one order collide on the unique key, and the loser reports the winner's.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import Dialect, Engine, bindparam, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from consumers import store
from consumers.handler import order_id_of, stable_event_id
from messaging import database, envelope, keys
from messaging.handler import outcome

QUEUE = keys.SHIPPING_QUEUE
SENDER = "shipping-service"
CARRIER = "SimParcel"
"""The simulated carrier's name, reported in ShipmentBooked."""
_TRACKING_ALPHABET = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZ"
_TRACKING_DIGITS = 16


def tracking_number() -> str:
    """A new random tracking number, e.g. ``1Z7K3M9Q2W4E6R8T0Y``.

    One draw from the system's random source for all 16 characters (uniform, as 16
    draws of one character each were, at a sixteenth of the calls).
    """
    base = len(_TRACKING_ALPHABET)
    n = secrets.randbelow(base**_TRACKING_DIGITS)
    digits = []
    for _ in range(_TRACKING_DIGITS):
        n, digit = divmod(n, base)
        digits.append(_TRACKING_ALPHABET[digit])
    return "1Z" + "".join(digits)


def book(order_id: int) -> tuple[str, str, str]:
    """Book a parcel with the simulated carrier: (shipment id, carrier, tracking number)."""
    return f"shp_{uuid.uuid4().hex[:24]}", CARRIER, tracking_number()


def booked_event(shipment: store.Shipment) -> dict[str, Any]:
    """The ShipmentBooked event of a shipment (the same id every time)."""
    return _booked(
        shipment.order_id,
        shipment.shipment_id,
        shipment.carrier,
        shipment.tracking_number,
        shipment.booked_at,
    )


def _booked(
    order_id: int, shipment_id: str, carrier: str, tracking: str, at: datetime
) -> dict[str, Any]:
    return outcome(
        envelope.SHIPMENT_BOOKED,
        {
            "order_id": order_id,
            "shipment_id": shipment_id,
            "carrier": carrier,
            "tracking_number": tracking,
        },
        order_id=order_id,
        sender=SENDER,
        message=f"Shipment booked for order #{order_id}: {carrier} {tracking}",
        event_id=stable_event_id(envelope.SHIPMENT_BOOKED, order_id),
        at=at,
    )


SQL = database.DriverStatements(
    booked=lambda _dialect: select(store.Shipment.shipment_id).where(
        store.Shipment.order_id == bindparam("order_id")
    ),
    book=lambda _dialect: insert(store.Shipment).values(
        **database.binds(
            "shipment_id", "order_id", "carrier", "tracking_number", "event_id", "booked_at"
        ),
    ),
)


def _ship_new(event: dict[str, Any], order_id: int) -> store.NewEffect:
    """The fast path's effect (:func:`consumers.store.process_new`): book a new shipment;
    None when the order has one already (the full path reports that one)."""

    def effect(cursor: Any, dialect: Dialect) -> list[dict[str, Any]] | None:
        if SQL(dialect, "booked").first(cursor, order_id=order_id) is not None:
            return None
        shipment_id, carrier, tracking = book(order_id)
        at = store.now()
        SQL(dialect, "book").execute(
            cursor,
            shipment_id=shipment_id,
            order_id=order_id,
            carrier=carrier,
            tracking_number=tracking,
            event_id=event["id"],
            booked_at=at,
        )
        return [_booked(order_id, shipment_id, carrier, tracking, at)]

    return effect


class ShippingHandler:
    """Books each paid order's shipment once and reports ShipmentBooked."""

    queue = QUEUE
    accepts = envelope.accepted_by(QUEUE)

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def handle(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """Book (idempotently) and return the outcome event."""
        order_id = order_id_of(event)
        fast = store.process_new(self.engine, QUEUE, event, _ship_new(event, order_id))
        if fast is not None:
            return fast
        try:
            emitted, _new = store.process_once(
                self.engine, QUEUE, event, lambda session: _ship(session, event, order_id)
            )
        except IntegrityError:
            # Another event of the same order booked it concurrently: report that one.
            with Session(self.engine) as session:
                shipment = session.scalars(
                    select(store.Shipment).where(store.Shipment.order_id == order_id)
                ).first()
                if shipment is None:
                    raise
                return [booked_event(shipment)]
        return emitted

    def handle_batch(
        self, events: list[dict[str, Any]], stopping: Callable[[], bool] = bool
    ) -> list[list[dict[str, Any]] | None]:
        """Book a taken batch's shipments in ONE transaction (all committed or none).

        An event with bad data is left to :meth:`handle` (which dead-letters it); a
        concurrent booking of one of the orders makes the transaction fail, and the
        worker then handles each event alone, which reports the winner's shipment.
        """
        return store.process_new_batch(
            self.engine, QUEUE, events, store.new_effects(order_id_of, _ship_new)
        )


def _ship(session: Session, event: dict[str, Any], order_id: int) -> list[dict[str, Any]]:
    """Book the order's shipment in the session's transaction (or find the one it has)."""
    shipment = session.scalars(
        select(store.Shipment).where(store.Shipment.order_id == order_id)
    ).first()
    if shipment is None:  # else: another capture of the same order; one shipment
        shipment_id, carrier, tracking = book(order_id)
        shipment = store.Shipment(
            shipment_id=shipment_id,
            order_id=order_id,
            carrier=carrier,
            tracking_number=tracking,
            event_id=event["id"],
        )
        session.add(shipment)
        session.flush()
    return [booked_event(shipment)]
