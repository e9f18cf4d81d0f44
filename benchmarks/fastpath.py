"""One new event's database work three ways: the ORM, Core on a connection, the driver.

``python -m benchmarks.fastpath [--events 2000]`` times, in this process on an SQLite
file of its own, the shipping consumer's transaction for a new PaymentCaptured (look
for the processed row, look for the order's shipment, book it, record the processed
row) as the three layers do it, and prints the CPU per event (``time.process_time``):

- the ORM path (``consumers.store.process_once`` with ``shipping._ship``), which every
  case but the common one still takes;
- the same statements in SQLAlchemy Core on one connection per event;
- the driver path (``consumers.store.process_new`` with the statements compiled once,
  ``messaging.database.DriverStatement``), the common case's.

The gap between the last two is SQLAlchemy's per-execution machinery (compiled-cache
look-up, parameter and result processing, transaction bookkeeping), not SQLite's work.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select

from consumers import shipping, store

QUEUE = "shipping"


def captured(order_id: int) -> dict[str, Any]:
    """A new PaymentCaptured event (a new id) for ``order_id``."""
    return {
        "id": str(uuid.uuid4()),
        "type": "PaymentCaptured",
        "data": {"order_id": order_id, "payment_id": "p", "amount": "1.00", "currency": "EUR"},
        "timestamp": "2026-01-01T00:00:00+00:00",
    }


def main(argv: list[str] | None = None) -> int:
    """Print the CPU per event of each layer."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fastpath", description=__doc__)
    parser.add_argument("--events", type=int, default=2000, help="events per layer (2000)")
    args = parser.parse_args(argv)
    engine = store.make_engine(f"sqlite:///{Path(tempfile.mkdtemp()) / 'shipping.db'}")
    store.create_tables(engine, "shipping")
    processed, shipments = store.Processed.__table__, store.Shipment.__table__

    def orm(event: dict[str, Any]) -> Any:
        order_id = event["data"]["order_id"]
        return store.process_once(
            engine, QUEUE, event, lambda session: shipping._ship(session, event, order_id)
        )

    def core(event: dict[str, Any]) -> Any:
        order_id = event["data"]["order_id"]
        with engine.begin() as conn:
            found = conn.execute(
                select(processed.c.outcome).where(
                    processed.c.queue == QUEUE, processed.c.event_id == event["id"]
                )
            ).scalar()
            if found is not None:
                return json.loads(found)
            if conn.execute(select(shipments).where(shipments.c.order_id == order_id)).first():
                return None
            shipment_id, carrier, tracking = shipping.book(order_id)
            at = store.now()
            conn.execute(
                insert(shipments).values(
                    shipment_id=shipment_id, order_id=order_id, carrier=carrier,
                    tracking_number=tracking, event_id=event["id"], booked_at=at,
                )
            )  # fmt: skip
            outcome = [shipping._booked(order_id, shipment_id, carrier, tracking, at)]
            conn.execute(
                insert(processed).values(
                    queue=QUEUE, event_id=event["id"], order_id=order_id,
                    outcome=json.dumps(outcome), processed_at=at,
                )
            )  # fmt: skip
        return outcome

    def driver(event: dict[str, Any]) -> Any:
        order_id = event["data"]["order_id"]
        return store.process_new(engine, QUEUE, event, shipping._ship_new(event, order_id))

    layers: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
        ("ORM (process_once)", orm),
        ("Core on a connection", core),
        ("driver (process_new)", driver),
    ]
    print(f"shipping's transaction for a new event, {args.events} events per layer, SQLite:")
    for n, (label, handle) in enumerate(layers):
        events = [captured(n * args.events + i + 1) for i in range(args.events)]
        handle(captured(10_000_000 + n))  # warm: compile, connect
        start = time.process_time()
        for event in events:
            if handle(event) is None:
                raise SystemExit(f"{label}: a new event was not handled as new")
        spent = time.process_time() - start
        print(f"  {label}: {spent / args.events * 1e6:,.0f} µs CPU per event")
    engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
