"""The order-updates consumer: records every outcome event in the order's history.

Conceptually part of the order service (run it as ``consumer updates``): it drains
``pending(ORDER_UPDATES_QUEUE)`` and calls :func:`orders.history.record_event` in one
transaction per event. Recording is idempotent by event id, so a redelivered or
re-emitted outcome changes nothing.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from consumers.queue import PermanentError
from orders import history, keys


class UpdatesHandler:
    """Records outcome events (PaymentCaptured, InvoiceIssued, ...) for the order service."""

    queue = keys.ORDER_UPDATES_QUEUE
    accepts = frozenset(history.OUTCOME_TYPES)

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def handle(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """Record the event (no-op if recorded before); emits nothing."""
        try:
            with Session(self.engine) as session, session.begin():
                history.record_event(session, event)
        except (ValueError, history.UnknownOrder) as exc:
            raise PermanentError(f"cannot record {event.get('type')}: {exc}") from exc
        return []


class NoopHandler:
    """Accepts OrderPlaced and does nothing (``consumer noop``: benchmarks, smoke tests)."""

    queue = keys.NOOP_QUEUE
    accepts = frozenset({"OrderPlaced"})

    def handle(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """Nothing to do, nothing to emit."""
        return []
