"""The order-updates consumer: records every outcome event in the order's history.

Part of the order service (``orders-updates``): it is the only worker that writes the
order service's database, and it learns what the other services did only from their
events. It drains ``pending(ORDER_UPDATES_QUEUE)`` and calls
:func:`orders.history.record_event` in one transaction per event. Recording is
idempotent by event id, so a redelivered or re-emitted outcome changes nothing.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from messaging import keys, runner
from messaging.config import WorkerSettings, command_line, database_url, load_settings
from messaging.database import database_engine
from messaging.queue import PermanentError
from orders import history
from orders.bootstrap import create_schema


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


def main(argv: list[str] | None = None) -> int:
    """Console script ``orders-updates``: record outcome events until SIGTERM/SIGINT."""
    parser = command_line(
        "orders-updates",
        "Record the other services' outcome events in the order service's database\n"
        "(order history and status). Reads DATABASE_URL, REDIS_*, CONSUMER_*.",
    )
    parser.add_argument("--concurrency", type=int, default=None, help="handler threads")
    args = parser.parse_args(argv)
    if args.concurrency is not None and not 1 <= args.concurrency <= 256:
        parser.error(f"invalid --concurrency {args.concurrency}")
    settings = load_settings("orders-updates", WorkerSettings.from_env)
    url = load_settings("orders-updates", lambda: database_url(os.environ, "DATABASE_URL"))

    def open_handler() -> tuple[UpdatesHandler, Any]:
        engine = database_engine(url)
        try:
            create_schema(engine)  # the order service's tables (idempotent)
        except SQLAlchemyError as exc:
            engine.dispose()
            first = str(exc).splitlines()[0]
            raise runner.CannotStart(f"cannot open the database: {first}") from exc
        return UpdatesHandler(engine), engine.dispose

    return runner.run(
        "orders-updates", "updates", settings, open_handler, concurrency=args.concurrency
    )


if __name__ == "__main__":
    sys.exit(main())
