"""Console script ``orders-api``: the order API under gunicorn.

The master process validates the settings (a bad value is one line on stderr and exit
2) and creates the tables once, before any worker exists. Each worker then builds its
own app, database engine and Redis client after the fork (no connection is shared
across processes) and, with ``RELAY_IN_PROCESS=1``, runs an outbox relay thread; the
relays' row claims keep the workers from publishing the same event twice.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication
from sqlalchemy.exc import SQLAlchemyError

from messaging import logs, tracing
from messaging.config import command_line, load_settings
from messaging.database import database_engine
from orders import auth
from orders.bootstrap import create_schema, order_services
from orders.config import OrderServiceSettings
from orders.httpworker import shed_stale_requests
from orders.outbox import EXIT_NO_DATABASE, one_line, start_relay_thread

log = logging.getLogger("orders-api")

_relay_stop: threading.Event | None = None


_app: Flask | None = None


def _worker_exit(_server: Any, _worker: Any) -> None:
    if _relay_stop is not None:
        _relay_stop.set()
    if _app is not None:
        from orders.api import PUBLISHER

        publisher = _app.extensions.get(PUBLISHER)
        if publisher is not None:
            # Publish and mark what this worker accepted (else: the relay sends it
            # once the claims expire, or again if it was published but not marked).
            publisher.close()
    tracing.shutdown()  # export the spans still queued


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""Where each worker's prometheus_client writes its samples (read by any /metrics)."""


def _child_exit(_server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # drops its live-gauge files


def prepare_metrics_dir(configured: str) -> tuple[Path, bool]:
    """Set PROMETHEUS_MULTIPROC_DIR for the workers; returns (dir, created by us).

    Must run before prometheus_client is imported (it picks its storage at import).
    A configured directory is emptied: samples of a previous run would add up.
    """
    if configured:
        path = Path(configured)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
        created = False
    else:
        path = Path(tempfile.mkdtemp(prefix="orders-api-metrics-"))
        created = True
    os.environ[MULTIPROC_ENV] = str(path)
    return path, created


class OrdersServer(BaseApplication):  # type: ignore[misc]
    """gunicorn configured from :class:`OrderServiceSettings`, not from argv."""

    def __init__(self, settings: OrderServiceSettings) -> None:
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        """Bind, workers and threads from the settings; logs to stdout."""
        s = self.settings
        self.cfg.set("bind", [f"{s.host}:{s.port}"])
        self.cfg.set("workers", s.web_concurrency)
        self.cfg.set("threads", s.web_threads)
        # gthread that drops requests whose client left and 503s the ones queued too long.
        self.cfg.set("worker_class", "orders.httpworker.SheddingThreadWorker")
        self.cfg.set("errorlog", "-")
        self.cfg.set("loglevel", s.base.log_level.lower())
        self.cfg.set("proc_name", "orders-api")
        self.cfg.set("worker_exit", _worker_exit)
        self.cfg.set("child_exit", _child_exit)
        if "control_socket_disable" in self.cfg.settings:
            # gunicorn 25+ binds one control socket per user ($HOME/.gunicorn/gunicorn.ctl):
            # every orders-api on the machine would share it, and `gunicornc shutdown`
            # could stop another checkout's API. Nothing here uses it.
            self.cfg.set("control_socket_disable", True)

    def load(self) -> Flask:
        """Runs in each worker after the fork: build the app (and the relay thread)."""
        global _relay_stop, _app
        logs.configure(self.settings.base.log_format, self.settings.base.log_level)
        # Per worker, after the fork: the exporter's thread and socket are this process's.
        tracing.configure_process(self.settings.base, "orders-api")
        # Before importing the app (importing orders.metrics creates its counter files):
        # the directory exists, but a configured one may have been removed by hand.
        if os.environ.get(MULTIPROC_ENV):
            Path(os.environ[MULTIPROC_ENV]).mkdir(parents=True, exist_ok=True)
        from orders.app import create_app

        services = order_services(self.settings)
        app = create_app(services=services)
        _app = app
        app.wsgi_app = shed_stale_requests(  # type: ignore[method-assign,assignment]
            app.wsgi_app, self.settings.request_queue_timeout
        )
        if self.settings.relay_in_process:
            _, _relay_stop = start_relay_thread(services)
        return app


def main(argv: list[str] | None = None) -> int:
    """Console script ``orders-api``."""
    command_line("orders-api", __doc__).parse_args(argv)  # only --help
    settings = load_settings("orders-api", OrderServiceSettings.from_env)
    logs.configure(settings.base.log_format, settings.base.log_level)
    try:
        engine = database_engine(settings.database_url)
        try:
            create_schema(engine)
        finally:
            engine.dispose()  # the workers open their own connections after the fork
    except (SQLAlchemyError, OSError) as exc:
        print(f"orders-api: cannot use DATABASE_URL: {one_line(exc)}", file=sys.stderr)
        return EXIT_NO_DATABASE
    log.info(
        "orders-api on http://%s:%d: %d workers x %d threads, pattern %s, relay %s",
        settings.host, settings.port, settings.web_concurrency, settings.web_threads,
        settings.base.pattern, "in process" if settings.relay_in_process else "separate",
    )  # fmt: skip
    settings = auth.with_token(settings)  # before the fork: one token for every worker
    metrics_dir, created = prepare_metrics_dir(settings.metrics_dir)
    master = os.getpid()
    try:
        OrdersServer(settings).run()
    finally:
        # Only the master removes it. A worker is a fork of this very call: gunicorn
        # ends it with sys.exit, whose SystemExit unwinds through this ``finally`` in
        # the worker too, and that deleted the directory under the live workers (their
        # samples lost; a worker booting meanwhile failed: exit 3 of the whole server).
        if created and os.getpid() == master:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
