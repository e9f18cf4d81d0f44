"""Console script ``consumer NAME`` (also ``python -m consumers NAME``).

NAME is ``payment``, ``invoice``, ``shipping``, ``email``, ``updates`` (records outcome events in
the order service's history) or ``noop`` (benchmarks). Exit codes: 0 stopped by a
signal, 1 Redis (or the database) unreachable at start, 2 bad configuration (one line
on stderr).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from consumers import metrics, store
from consumers.email import EmailHandler
from consumers.handler import Handler
from consumers.invoice import InvoiceHandler
from consumers.payment import PaymentHandler
from consumers.queue import RedisQueue
from consumers.shipping import ShippingHandler
from consumers.updates import NoopHandler, UpdatesHandler
from consumers.worker import Worker
from orders import keys, logs
from orders.bootstrap import connect_with_retries, create_schema, redis_client
from orders.config import (
    EXIT_BAD_CONFIG,
    EXIT_NO_REDIS,
    EXIT_OK,
    ConfigError,
    ConsumerSettings,
)
from orders.publisher import EventPublisher

log = logging.getLogger("consumer")

EXIT_NO_DATABASE = 1
"""The database could not be reached at start (as orders-relay)."""

HANDLERS: dict[str, Callable[[Engine, ConsumerSettings], Handler]] = {
    "payment": PaymentHandler.from_settings,
    "invoice": lambda engine, _settings: InvoiceHandler(engine),
    "shipping": lambda engine, _settings: ShippingHandler(engine),
    "email": EmailHandler.from_settings,
    "updates": lambda engine, _settings: UpdatesHandler(engine),
    "noop": lambda _engine, _settings: NoopHandler(),
}
"""Consumer name -> handler factory."""


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"consumer: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_CONFIG)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = _OneLineParser(prog="consumer", description="Run a consumer worker.")
    parser.add_argument("name", metavar="NAME", help=f"one of: {', '.join(HANDLERS)}")
    parser.add_argument("--concurrency", type=int, default=None, help="handler threads")
    args = parser.parse_args(argv)
    if args.name not in HANDLERS:
        parser.error(f"unknown consumer {args.name!r}: must be one of {', '.join(HANDLERS)}")
    if args.concurrency is not None and not 1 <= args.concurrency <= 256:
        parser.error(f"invalid --concurrency {args.concurrency}: must be between 1 and 256")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run one consumer until SIGTERM/SIGINT."""
    args = _parse(argv)
    try:
        settings = ConsumerSettings.from_env()
    except ConfigError as exc:
        print(f"consumer: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    logs.configure(settings.base.log_format, settings.base.log_level)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():  # the second signal: no more waiting
            os._exit(128 + signum)
        log.info("%s: received signal %d, finishing current messages", args.name, signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    # Messages are bytes end to end: garbage that is not UTF-8 must still be readable.
    client = redis_client(settings.base, decode_responses=False)
    if not connect_with_retries(client, settings.base, stop):
        return EXIT_OK if stop.is_set() else EXIT_NO_REDIS

    engine = store.make_engine(settings.database_url)
    try:
        if args.name == "updates":
            create_schema(engine)  # the order service's tables (idempotent)
        elif args.name != "noop":
            store.create_tables(engine)
    except SQLAlchemyError as exc:
        print(f"consumer: cannot open the database: {str(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_NO_DATABASE

    handler = HANDLERS[args.name](engine, settings)
    if settings.metrics_port:
        try:
            metrics.serve(settings.metrics_port)
        except OSError as exc:
            print(f"consumer: cannot serve metrics on METRICS_PORT: {exc}", file=sys.stderr)
            return EXIT_BAD_CONFIG
    queue = RedisQueue(
        client,
        keys.ORDER_UPDATES_QUEUE if args.name == "updates" else handler.queue,
        max_attempts=settings.max_attempts,
        backoff_base=settings.backoff_base,
        backoff_max=settings.backoff_max,
    )
    worker = Worker(
        queue,
        handler,
        EventPublisher(
            client, settings.base.pattern, wait_replicas=settings.base.redis_wait_replicas
        ),
        concurrency=args.concurrency or settings.concurrency,
        batch_size=settings.batch_size,
        heartbeat_ttl=settings.heartbeat_ttl,
        stop=stop,
    )
    try:
        return worker.run()
    finally:
        engine.dispose()
        client.close()


if __name__ == "__main__":
    sys.exit(main())
