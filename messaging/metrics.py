"""A consumer process's own Prometheus metrics, served on METRICS_PORT (0 = off).

Only what this process alone knows: events it handled or failed, and the end-to-end
latency from an event's timestamp (for OrderPlaced: the order placed) to its handling
here. Queue depths and the queues' processed/failed totals live in Redis and are read
at scrape time by the order service's ``/metrics``, so that ten consumers of one
queue do not report the same depth ten times.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

HANDLED = Counter(
    "consumer_events",
    "Events this process settled, by queue and outcome (handled, failed).",
    ["queue", "outcome"],
)
END_TO_END = Histogram(
    "consumer_end_to_end_seconds",
    "Seconds from the event's timestamp (an OrderPlaced: the order placed) to handled here.",
    ["queue", "type"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
)

HEALTHY = Gauge(
    "consumer_healthy",
    "1 while every handler thread of this worker is alive and not stuck, else 0.",
    ["queue"],
)


def set_healthy(queue: str, healthy: bool) -> None:
    """The liveness gauge (0 just before an unhealthy worker exits)."""
    HEALTHY.labels(queue).set(1 if healthy else 0)


def event_age(event: dict[str, Any], now: datetime | None = None) -> float | None:
    """Seconds since the envelope's timestamp, or None when it has no usable one."""
    raw = event.get("timestamp")
    if not isinstance(raw, str):
        return None
    try:
        stamp = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None
    if stamp.tzinfo is None:
        return None
    return max(0.0, ((now or datetime.now(UTC)) - stamp).total_seconds())


def observe_handled(queue: str, event: dict[str, Any]) -> None:
    """Count a handled event and observe its end-to-end latency."""
    HANDLED.labels(queue, "handled").inc()
    age = event_age(event)
    if age is not None:
        END_TO_END.labels(queue, str(event.get("type"))).observe(age)


def observe_failed(queue: str) -> None:
    """Count a failed attempt."""
    HANDLED.labels(queue, "failed").inc()


def serve(port: int) -> None:
    """Serve /metrics on ``port`` in a daemon thread (all interfaces: containers)."""
    start_http_server(port)
    log.info("metrics on http://0.0.0.0:%d/metrics", port)
