"""Prometheus metrics of the order service: ``GET /metrics`` (a Flask blueprint).

Two kinds of figures, gathered differently on purpose:

- **Counted in the process** (requests by route/method/status, request latency, orders
  placed): prometheus_client counters and histograms. gunicorn runs several worker
  processes, so ``orders-api`` runs prometheus_client in *multiprocess mode*: each
  worker writes its samples to files in ``PROMETHEUS_MULTIPROC_DIR`` (see
  :mod:`orders.server`) and a scrape of any worker adds up all of them.
- **Read at scrape time** from where they live, so every worker answers the same and
  nothing is double counted: the queues (pending, in flight, delayed, dead letters,
  workers alive, processed/failed/retried totals from each queue's stats hash) from
  Redis, and the outbox (backlog, events published) and the stuck orders (not settled,
  no step for ORDER_STUCK_SECONDS: :mod:`orders.stuck`) from the database. Custom
  collectors (:class:`QueueCollector`, :class:`OutboxCollector`,
  :class:`StuckCollector`) do the reading. Automatic reconciliation
  (:mod:`orders.reconcile`) counts its passes and re-publishes in the process that ran
  them (``orders_reconcile_*``).

If Redis or the database is down the scrape still answers: ``orders_redis_up`` or
``orders_database_up`` is 0 and that source's figures are left out.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator

import redis
from flask import Blueprint, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, case, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from messaging import monitor
from orders import stuck
from orders.extensions import services
from orders.models import Outbox

log = logging.getLogger("orders-api")
metrics = Blueprint("metrics", __name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus_client reads this variable itself (when it is imported)."""

REQUESTS = Counter(
    "orders_http_requests",
    "HTTP requests answered by the order service.",
    ["route", "method", "status"],
)
LATENCY = Histogram(
    "orders_http_request_duration_seconds",
    "Time to answer an HTTP request (the event stream is not timed).",
    ["route", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
ORDERS_PLACED = Counter("orders_placed", "Orders created by POST /orders (not replays).")
COMMIT_BATCH = Histogram(
    "orders_intake_commit_batch_size",
    "Orders per intake transaction, replays of a stored Idempotency-Key included"
    " (concurrent POSTs of a worker share one: group commit).",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
)

UNTIMED_ENDPOINTS = frozenset({"dashboard.event_stream"})
"""Long-lived responses: counted, but their duration is not a latency."""


class QueueCollector(Collector):
    """Reads every queue's figures from Redis at each scrape."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def collect(self) -> Iterator[Metric]:
        """Yield one sample per queue and figure, and ``orders_redis_up``."""
        up = GaugeMetricFamily("orders_redis_up", "1 if Redis answered this scrape.")
        try:
            figures = monitor.all_figures(self.client)
        except redis.RedisError as exc:
            log.warning("metrics: Redis unreachable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        gauges = {
            "pending": "Messages waiting in the queue.",
            "in_flight": "Messages taken by a worker and not yet settled.",
            "delayed": "Failed messages waiting for their retry.",
            "dead": "Dead letters (failed for good, waiting for an operator).",
            "workers_alive": "Registered workers with a live heartbeat.",
        }
        for field, doc in gauges.items():
            family = GaugeMetricFamily(f"orders_queue_{field}", doc, labels=["queue"])
            for f in figures:
                family.add_metric([f.name], getattr(f, field))
            yield family
        counters = {
            "processed": "Messages handled and acked (the queue's stats hash).",
            "failed": "Handler failures, each retried or dead-lettered.",
            "retried": "Failures scheduled for a retry.",
        }
        for field, doc in counters.items():
            counter = CounterMetricFamily(f"orders_queue_{field}", doc, labels=["queue"])
            for f in figures:
                counter.add_metric([f.name], getattr(f, field))
            yield counter


class OutboxCollector(Collector):
    """Reads the outbox's backlog and published count from the database at each scrape."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        """Yield ``orders_outbox_backlog``, ``orders_events_published_total``, ``..._up``."""
        up = GaugeMetricFamily("orders_database_up", "1 if the database answered this scrape.")
        published_col = case((Outbox.published_at.is_not(None), 1), else_=0)
        try:
            with self.engine.connect() as conn:
                total, published = conn.execute(
                    select(func.count(Outbox.id), func.coalesce(func.sum(published_col), 0))
                ).one()
        except SQLAlchemyError as exc:
            log.warning("metrics: database unreachable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        backlog = GaugeMetricFamily(
            "orders_outbox_backlog", "Stored events not yet published to Redis."
        )
        backlog.add_metric([], int(total) - int(published))
        yield backlog
        sent = CounterMetricFamily(
            "orders_events_published", "Events of the order service published to Redis (outbox)."
        )
        sent.add_metric([], int(published))
        yield sent


class StuckCollector(Collector):
    """Counts the stuck orders (:func:`orders.stuck.stuck_orders`) at each scrape."""

    def __init__(self, engine: Engine, older_than: float) -> None:
        self.engine = engine
        self.older_than = older_than

    def collect(self) -> Iterator[Metric]:
        """Yield ``orders_stuck`` (nothing when the database does not answer)."""
        try:
            with Session(self.engine) as session:
                report = stuck.stuck_orders(session, self.older_than)
        except SQLAlchemyError as exc:  # orders_database_up already says 0
            log.warning("metrics: cannot count stuck orders: %s", exc)
            return
        gauge = GaugeMetricFamily(
            "orders_stuck",
            "Orders placed in the last day, not settled, with no step recorded for "
            "ORDER_STUCK_SECONDS (what a pub/sub consumer missed, or Redis lost).",
        )
        gauge.add_metric([], report.total)
        yield gauge


def exposition(client: redis.Redis, engine: Engine, stuck_seconds: float = 30.0) -> bytes:
    """The whole text exposition: this process (or all workers) plus Redis and DB reads."""
    scraped = CollectorRegistry()
    scraped.register(QueueCollector(client))
    scraped.register(OutboxCollector(engine))
    scraped.register(StuckCollector(engine, stuck_seconds))
    if os.environ.get(MULTIPROC_ENV):
        counted = CollectorRegistry()
        multiprocess.MultiProcessCollector(counted)
    else:
        counted = REGISTRY
    return generate_latest(counted) + generate_latest(scraped)


@metrics.get("/metrics")
def scrape() -> Response:
    """Prometheus text format."""
    svc = services()
    return Response(
        exposition(svc.monitor, svc.engine, svc.settings.stuck_seconds),
        headers={"Content-Type": CONTENT_TYPE_LATEST, "Cache-Control": "no-store"},
    )


def _route() -> str:
    rule = request.url_rule
    return rule.rule if rule is not None else "<unmatched>"


@metrics.before_app_request
def _start_timer() -> None:
    g.metrics_started = time.perf_counter()


@metrics.after_app_request
def _count(response: Response) -> Response:
    route, method = _route(), request.method
    REQUESTS.labels(route, method, str(response.status_code)).inc()
    started = g.pop("metrics_started", None)
    if started is not None and request.endpoint not in UNTIMED_ENDPOINTS:
        LATENCY.labels(route, method).observe(time.perf_counter() - started)
    if request.endpoint == "orders.create_order" and response.status_code == 201:
        ORDERS_PLACED.inc()
    return response
