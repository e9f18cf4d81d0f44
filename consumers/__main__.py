"""Console script ``consumer NAME`` (also ``python -m consumers NAME``).

NAME is ``payment``, ``invoice``, ``shipping``, ``email`` or ``noop`` (benchmarks). Each
service opens its own database (``<NAME>_DATABASE_URL``) and creates its own tables; the
run itself is the messaging core's (:mod:`messaging.runner`). Exit codes: 0 stopped by a signal,
1 Redis (or the database) unreachable at start, 2 bad configuration (one line on
stderr), 3 unhealthy (a handler thread died or hung; see :mod:`messaging.worker`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from consumers import store
from consumers.config import ConsumerSettings
from consumers.email import EmailHandler
from consumers.invoice import InvoiceHandler
from consumers.noop import NoopHandler
from consumers.payment import PaymentHandler
from consumers.shipping import ShippingHandler
from messaging import runner
from messaging.config import command_line, load_settings
from messaging.handler import Handler

HANDLERS: dict[str, Callable[[Engine, ConsumerSettings], Handler]] = {
    "payment": PaymentHandler.from_settings,
    "invoice": lambda engine, _settings: InvoiceHandler(engine),
    "shipping": lambda engine, _settings: ShippingHandler(engine),
    "email": EmailHandler.from_settings,
}
"""Consumer service name -> handler factory (its engine is its own database's)."""

NAMES = (*HANDLERS, "noop")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = command_line(
        "consumer",
        "Run one consumer service's worker: it takes its queue's messages, does its work\n"
        "in its own database, emits the outcome event, then acknowledges.",
    )
    parser.add_argument("name", metavar="NAME", help=f"one of: {', '.join(NAMES)}")
    parser.add_argument("--concurrency", type=int, default=None, help="handler threads")
    args = parser.parse_args(argv)
    if args.name == "updates":
        parser.error("'updates' is the order service's worker now: run orders-updates")
    if args.name not in NAMES:
        parser.error(f"unknown consumer {args.name!r}: must be one of {', '.join(NAMES)}")
    if args.concurrency is not None and not 1 <= args.concurrency <= 256:
        parser.error(f"invalid --concurrency {args.concurrency}: must be between 1 and 256")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run one consumer until SIGTERM/SIGINT."""
    args = _parse(argv)
    settings = load_settings("consumer", lambda: ConsumerSettings.from_env(service=args.name))

    def open_handler() -> tuple[Handler, Callable[[], None]]:
        if not settings.database_url:  # noop: no data of its own
            return NoopHandler(), lambda: None
        engine = store.make_engine(settings.database_url)
        try:
            store.create_tables(engine, args.name)
        except SQLAlchemyError as exc:
            engine.dispose()
            first = str(exc).splitlines()[0]
            raise runner.CannotStart(f"cannot open the database: {first}") from exc
        return HANDLERS[args.name](engine, settings), engine.dispose

    return runner.run(
        "consumer", args.name, settings.worker, open_handler, concurrency=args.concurrency
    )


if __name__ == "__main__":
    sys.exit(main())
