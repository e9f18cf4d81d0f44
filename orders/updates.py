"""The order-updates consumer: records every outcome event in the order's history.

Part of the order service (``orders-updates``): it is the only worker that writes the
order service's database, and it learns what the other services did only from their
events. It drains ``pending(ORDER_UPDATES_QUEUE)`` and calls
:func:`orders.history.record_events_now` for each taken batch, in one short transaction
(:meth:`UpdatesHandler.handle_batch`). Recording is idempotent by event id, so a
redelivered or re-emitted outcome changes nothing.

PATTERN applies to it as to the consumers (:mod:`messaging.runner`): with ``pubsub`` it
takes the outcomes from the order channel, at most once; with ``queue`` it also
announces each newly recorded outcome on that channel, the live feed's only source then.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import redis
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from messaging import envelope, keys, runner
from messaging.config import WorkerSettings, command_line, database_url, load_settings
from messaging.connection import redis_client
from messaging.database import database_engine
from messaging.queue import PermanentError
from orders import history
from orders.bootstrap import create_schema

log = logging.getLogger("orders-updates")


Announcer = Callable[[dict[str, Any]], None]
"""Tells the live feed about a newly recorded event (PATTERN=queue, see below)."""


class UpdatesHandler:
    """Records outcome events (PaymentCaptured, InvoiceIssued, ...) for the order service.

    ``announce`` (given with ``PATTERN=queue``): called with each event once it is
    newly recorded, after the commit. With ``queue`` the consumers PUBLISH nothing, so
    this is what keeps the dashboard's live feed and ``orders-admin watch`` showing
    what the order service records; with ``pubsub`` and ``both`` every event is on
    the channel already.
    """

    queue = keys.ORDER_UPDATES_QUEUE
    accepts = frozenset(history.OUTCOME_TYPES)

    def __init__(self, engine: Engine, announce: Announcer | None = None) -> None:
        self.engine = engine
        self.announce = announce

    def handle(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """Record the event (no-op if recorded before); emits nothing."""
        try:
            recorded = history.record_event_now(self.engine, event)
        except (ValueError, history.UnknownOrder) as exc:
            raise PermanentError(f"cannot record {event.get('type')}: {exc}") from exc
        if recorded and self.announce is not None:
            self.announce(event)
        return []

    def handle_batch(
        self, events: list[dict[str, Any]], stopping: Callable[[], bool] = bool
    ) -> list[list[dict[str, Any]] | Exception | None]:
        """Record a taken batch in ONE short transaction (:func:`history.record_events_now`).

        The batch's statements are prepared first and written in one go, so the order
        database's write lock, which the API's POSTs need too, is held for a few
        statements, not for a batch of ORM round trips. An event that cannot be
        recorded is that event's permanent failure (dead-lettered with the reason).
        """
        recorded = history.record_events_now(self.engine, events)
        if self.announce is not None:  # after the commit, as handle does
            for event, done in zip(events, recorded, strict=True):
                if done is True:
                    self.announce(event)
        return [
            PermanentError(f"cannot record {event.get('type')}: {done}")
            if isinstance(done, Exception)
            else []
            for event, done in zip(events, recorded, strict=True)
        ]


def feed_announcer(client: redis.Redis) -> Announcer:
    """PUBLISH recorded events on the order channel; a failure only costs a feed line.

    The feed is live only (at most once) and the record is committed: a lost
    announcement must not make the message fail and be recorded again.
    """

    def announce(event: dict[str, Any]) -> None:
        try:
            client.publish(keys.ORDER_EVENTS_CHANNEL, envelope.dumps(event))
        except redis.RedisError as exc:
            log.warning("orders-updates: event %s recorded, not announced: %s", event["id"], exc)

    return announce


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
        if settings.base.pattern != "queue":
            return UpdatesHandler(engine), engine.dispose
        client = redis_client(settings.base)

        def close() -> None:
            engine.dispose()
            client.close()

        return UpdatesHandler(engine, feed_announcer(client)), close

    return runner.run(
        "orders-updates", "updates", settings, open_handler, concurrency=args.concurrency
    )


if __name__ == "__main__":
    sys.exit(main())
