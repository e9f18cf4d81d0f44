"""Running one queue worker process: signals, Redis at start, the handler, metrics.

PATTERN decides where the worker takes its events: from its queue (``queue``, ``both``:
:class:`~messaging.worker.Worker`, nothing lost) or from the order channel (``pubsub``:
:class:`~messaging.channel.ChannelWorker`, at most once).

Every worker process (the consumer services' ``consumer NAME`` and the order service's
``orders-updates``) starts the same way; only the handler differs. Exit codes: 0
stopped by a signal, 1 Redis (or the service's database) unreachable at start, 2 bad
configuration (one line on stderr), 3 unhealthy (a handler thread died or hung: the
worker dropped its heartbeat so its messages return; restart it). The first
SIGTERM/SIGINT lets the current messages finish; a second exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from messaging import logs, metrics, tracing
from messaging.channel import ChannelWorker
from messaging.config import EXIT_BAD_CONFIG, EXIT_NO_REDIS, EXIT_OK, WorkerSettings
from messaging.connection import connect_with_retries, redis_client
from messaging.handler import Handler
from messaging.publisher import EventPublisher
from messaging.queue import RedisQueue
from messaging.worker import Worker

log = logging.getLogger("consumer")

EXIT_CANNOT_START = 1
"""The service's own dependency (its database) could not be opened at start."""


class CannotStart(Exception):
    """Raised by a handler factory when the service cannot start (one-line message)."""


HandlerFactory = Callable[[], tuple[Handler, Callable[[], None]]]
"""Builds the handler once Redis answers; returns it and a function releasing its resources."""


def run(
    prog: str,
    name: str,
    settings: WorkerSettings,
    open_handler: HandlerFactory,
    *,
    concurrency: int | None = None,
) -> int:
    """Run one worker until SIGTERM/SIGINT; return the process's exit code."""
    logs.configure(settings.base.log_format, settings.base.log_level)
    tracing.configure_process(settings.base, service_name(name))
    try:
        return _run(prog, name, settings, open_handler, concurrency)
    finally:
        tracing.shutdown()  # exports the spans still queued


def service_name(name: str) -> str:
    """The default ``service.name`` of a worker: its events' sender (payment-service)."""
    return "orders-updates" if name == "updates" else f"{name}-service"


def _run(
    prog: str,
    name: str,
    settings: WorkerSettings,
    open_handler: HandlerFactory,
    concurrency: int | None,
) -> int:
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():  # the second signal: no more waiting
            os._exit(128 + signum)
        log.info("%s: received signal %d, finishing current messages", name, signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    # Messages are bytes end to end: garbage that is not UTF-8 must still be readable.
    client = redis_client(settings.base, decode_responses=False)
    if not connect_with_retries(client, settings.base, stop):
        return EXIT_OK if stop.is_set() else EXIT_NO_REDIS
    try:
        handler, close = open_handler()
    except CannotStart as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        client.close()
        return EXIT_CANNOT_START
    try:
        if settings.metrics_port:
            try:
                metrics.serve(settings.metrics_port)
            except OSError as exc:
                print(f"{prog}: cannot serve metrics on METRICS_PORT: {exc}", file=sys.stderr)
                return EXIT_BAD_CONFIG
        queue = RedisQueue(
            client,
            handler.queue,
            max_attempts=settings.max_attempts,
            max_crashes=settings.max_crashes,
            backoff_base=settings.backoff_base,
            backoff_max=settings.backoff_max,
            express_ratio=settings.express_ratio,
            retry_seconds=settings.retry_seconds,
            revive_seconds=settings.revive_seconds,
            revive_rate=settings.revive_rate,
        )
        publisher = EventPublisher(
            client, settings.base.pattern, wait_replicas=settings.base.redis_wait_replicas
        )
        threads = concurrency or settings.concurrency
        common: dict[str, Any] = {
            "batch_size": settings.batch_size,
            "heartbeat_ttl": settings.heartbeat_ttl,
            "stuck_seconds": settings.stuck_seconds,
            "stop": stop,
        }
        if settings.base.pattern == "pubsub":
            # The events come from the channel (at most once); the queue keeps failures.
            worker: Worker = ChannelWorker(
                queue, handler, publisher, channel_concurrency=threads, **common
            )
        else:
            worker = Worker(queue, handler, publisher, concurrency=threads, **common)
        return worker.run()
    finally:
        close()
        client.close()
