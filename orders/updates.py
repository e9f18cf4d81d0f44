"""The order-updates consumer: records every outcome event in the order's history.

Part of the order service (``orders-updates``): it is the only worker that writes the
order service's database, and it learns what the other services did only from their
events. It drains ``pending(ORDER_UPDATES_QUEUE)`` and calls
:func:`orders.history.record_events` for each taken batch, in one short transaction
(:meth:`UpdatesHandler.handle_batch`). Recording is idempotent by event id, so a
redelivered or re-emitted outcome changes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from messaging import keys, runner
from messaging.config import EXIT_BAD_CONFIG, ConfigError, WorkerSettings, database_url
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

    def handle_batch(
        self, events: list[dict[str, Any]], stopping: Callable[[], bool] = bool
    ) -> list[list[dict[str, Any]] | Exception | None]:
        """Record a taken batch in ONE short transaction (:func:`history.record_events`).

        The batch's statements are prepared first and written in one go, so the order
        database's write lock, which the API's POSTs need too, is held for a few
        statements, not for a batch of ORM round trips. An event that cannot be
        recorded is that event's permanent failure (dead-lettered with the reason).
        """
        with Session(self.engine) as session, session.begin():
            recorded = history.record_events(session, events)
        return [
            PermanentError(f"cannot record {event.get('type')}: {done}")
            if isinstance(done, Exception)
            else []
            for event, done in zip(events, recorded, strict=True)
        ]


def main(argv: list[str] | None = None) -> int:
    """Console script ``orders-updates``: record outcome events until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(
        prog="orders-updates",
        description="Record the other services' outcome events in the order service's "
        "database (order history and status). Reads DATABASE_URL, REDIS_*, CONSUMER_*.",
    )
    parser.add_argument("--concurrency", type=int, default=None, help="handler threads")
    args = parser.parse_args(argv)
    if args.concurrency is not None and not 1 <= args.concurrency <= 256:
        print(f"orders-updates: invalid --concurrency {args.concurrency}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    try:
        settings = WorkerSettings.from_env()
        url = database_url(os.environ, "DATABASE_URL")
    except ConfigError as exc:
        print(f"orders-updates: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG

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
