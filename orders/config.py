"""Configuration of the order service's processes (orders-api, orders-relay, orders-updates).

The variables every process reads (Redis, PATTERN, logging) and the worker runtime's
are declared in :mod:`messaging.config`; this module declares the order service's own
and reads them into :class:`OrderServiceSettings`. An invalid value raises
:class:`~messaging.config.ConfigError` with a one-line message.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from messaging.config import ConfigError as ConfigError
from messaging.config import (
    EnvVar,
    Settings,
    database_url,
    declare,
    env_choice,
    env_float,
    env_int,
    env_str,
)

ENV_VARS: tuple[EnvVar, ...] = declare(
    EnvVar(
        "DATABASE_URL",
        "sqlite:///var/orders.db",
        "The order service's own database: sqlite:///path or postgresql+psycopg://.",
    ),
    EnvVar("HOST", "127.0.0.1", "orders-api listen address (compose sets 0.0.0.0)."),
    EnvVar("PORT", "8000", "orders-api listen port."),
    EnvVar("WEB_CONCURRENCY", "2", "orders-api gunicorn worker processes."),
    EnvVar("WEB_THREADS", "8", "Threads per orders-api worker (gthread)."),
    EnvVar(
        "REQUEST_QUEUE_TIMEOUT_SECONDS",
        "10",
        "orders-api: a request that waited longer for a thread is answered 503, not run.",
    ),
    EnvVar("MAX_BODY_BYTES", "65536", "Largest accepted request body; larger is 413."),
    EnvVar("MAX_LINES", "100", "Most lines (items) in one order."),
    EnvVar(
        "RATE_LIMIT_PER_MINUTE",
        "600",
        "orders-api requests per client IP per minute (token bucket in Redis); 0 = off.",
    ),
    EnvVar(
        "AUTH_FAILURES_PER_MINUTE",
        "10",
        "Wrong operator tokens per client IP per minute before 429 (Redis bucket); 0 = off.",
    ),
    EnvVar("RELAY_IN_PROCESS", "1", "1: each orders-api worker runs an outbox relay thread."),
    EnvVar("RELAY_INTERVAL", "0.5", "Seconds between two outbox polls of the relay."),
    EnvVar("RELAY_BATCH", "100", "Most outbox rows the relay publishes per poll."),
    EnvVar("RELAY_CLAIM_SECONDS", "15", "Seconds a claimed outbox row is reserved."),
    EnvVar(
        "ORDER_STUCK_SECONDS",
        "30",
        "An unsettled order with no step for this many seconds is listed as stuck "
        "(dashboard, orders-admin stuck, the orders_stuck metric).",
    ),
    EnvVar(
        "RECONCILE_INTERVAL_SECONDS",
        "30",
        "Seconds between automatic reconciliation passes (one relay per pass holds a Redis "
        "lock); 0 = off.",
    ),
    EnvVar(
        "RECONCILE_AFTER_SECONDS",
        "300",
        "Reconciliation re-publishes an order stuck (no step) this long, at most once per "
        "this many seconds.",
    ),
    EnvVar("RECONCILE_BATCH", "100", "Most stuck orders one reconciliation pass re-publishes."),
    EnvVar(
        "PROMETHEUS_MULTIPROC_DIR",
        "",
        "orders-api metrics files of its workers (empty: a temp dir).",
    ),
    EnvVar(
        "STREAM_MAX_SECONDS",
        "300",
        "Dashboard event stream lifetime before the browser reconnects.",
    ),
    EnvVar("STREAM_KEEPALIVE_SECONDS", "15", "Seconds between keep-alive comments on the stream."),
    EnvVar("STREAM_PORT", "8100", "orders-stream listen port (the dashboard's live feed)."),
    EnvVar(
        "STREAM_URL",
        "",
        "Where the dashboard page opens its feed (empty: the page's host on STREAM_PORT).",
    ),
    EnvVar("STREAM_MAX_PER_CLIENT", "8", "Open event streams per client address; beyond: 429."),
    EnvVar("STREAM_MAX_CONNECTIONS", "2000", "Open event streams per orders-stream; beyond: 503."),
    EnvVar(
        "ADMIN_TOKEN",
        "",
        "Operator credential (16+ characters) for the dashboard, dead letters, GET /orders and "
        "/metrics: Bearer header, or the dashboard's login. Empty: orders-api generates one "
        "at start and logs the dashboard URL with it (docs/security.md).",
    ),
    EnvVar(
        "ALLOWED_HOSTS",
        "localhost,127.0.0.1,[::1]",
        "Comma-separated host names requests may name in Host (DNS rebinding guard); HOST "
        "is added; * allows any.",
    ),
)
"""The order service's own variables."""


def _stream_url(env: Mapping[str, str]) -> str:
    raw = env_str(env, "STREAM_URL")
    if raw and not raw.startswith(("http://", "https://", "/")):
        raise ConfigError(
            f"invalid STREAM_URL {raw!r}: must be an http(s):// URL or a path starting with /"
        )
    return raw


def _interval(env: Mapping[str, str], name: str) -> float:
    value = env_float(env, name, 0.0, 86400.0)
    if 0 < value < 0.1:
        raise ConfigError(f"invalid {name} {env_str(env, name)!r}: must be 0 (off) or >= 0.1")
    return value


@dataclass(frozen=True)
class OrderServiceSettings:
    """Configuration of orders-api and orders-relay: the common Settings plus their own."""

    base: Settings
    database_url: str
    host: str
    port: int
    web_concurrency: int
    web_threads: int
    max_body_bytes: int
    max_lines: int
    relay_in_process: bool
    relay_interval: float
    relay_batch: int
    relay_claim_seconds: float
    stream_max_seconds: float = 300.0
    stream_keepalive_seconds: float = 15.0
    stream_port: int = 8100
    request_queue_timeout: float = 10.0
    stream_url: str = ""
    """STREAM_URL: the page's EventSource URL; empty: same host, STREAM_PORT."""
    stream_max_per_client: int = 8
    stream_max_connections: int = 2000
    metrics_dir: str = ""
    rate_limit_per_minute: int = 600
    auth_failures_per_minute: int = 10
    """AUTH_FAILURES_PER_MINUTE: wrong operator tokens per client IP (burst the same); 0: off."""
    """RATE_LIMIT_PER_MINUTE: per client IP (burst of the same size); 0 turns it off."""
    admin_token: str = ""
    """ADMIN_TOKEN: the operator credential; empty: generated at start (orders.auth)."""
    allowed_hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "[::1]")
    """ALLOWED_HOSTS: host names a request's Host may name (HOST is added; * = any)."""
    stuck_seconds: float = 30.0
    """ORDER_STUCK_SECONDS: idle time after which an unsettled order counts as stuck."""
    reconcile_interval: float = 30.0
    """RECONCILE_INTERVAL_SECONDS: between automatic passes; 0 turns them off."""
    reconcile_after: float = 300.0
    """RECONCILE_AFTER_SECONDS: stuck this long, an order is re-published."""
    reconcile_batch: int = 100
    """RECONCILE_BATCH: most orders re-published per pass."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OrderServiceSettings:
        """Read and validate every variable; raise ConfigError on the first bad one."""
        env = os.environ if env is None else env
        host = env_str(env, "HOST")
        if not host:
            raise ConfigError("invalid HOST '': must not be empty")
        admin_token = env.get("ADMIN_TOKEN", "").strip()
        if admin_token and (len(admin_token) < 16 or not admin_token.isprintable()):
            # Never the value in the message: it is a secret.
            raise ConfigError(
                "invalid ADMIN_TOKEN: must be at least 16 printable characters "
                "(or empty: orders-api generates one)"
            )
        allowed = tuple(h.strip().lower() for h in env_str(env, "ALLOWED_HOSTS").split(","))
        if not all(allowed) or any(any(c.isspace() or c in "/@" for c in h) for h in allowed):
            raise ConfigError(
                f"invalid ALLOWED_HOSTS {env_str(env, 'ALLOWED_HOSTS')!r}: "
                "must be comma-separated host names, e.g. localhost,shop.example.com"
            )
        return cls(
            base=Settings.from_env(env),
            database_url=database_url(env, "DATABASE_URL"),
            host=host,
            port=env_int(env, "PORT", 1, 65535),
            web_concurrency=env_int(env, "WEB_CONCURRENCY", 1, 64),
            web_threads=env_int(env, "WEB_THREADS", 1, 64),
            max_body_bytes=env_int(env, "MAX_BODY_BYTES", 1024, 16 * 1024 * 1024),
            max_lines=env_int(env, "MAX_LINES", 1, 1000),
            relay_in_process=env_choice(env, "RELAY_IN_PROCESS", ("0", "1")) == "1",
            relay_interval=env_float(env, "RELAY_INTERVAL", 0.01, 3600.0),
            relay_batch=env_int(env, "RELAY_BATCH", 1, 10000),
            relay_claim_seconds=env_float(env, "RELAY_CLAIM_SECONDS", 1.0, 3600.0),
            stream_max_seconds=env_float(env, "STREAM_MAX_SECONDS", 1.0, 86400.0),
            stream_keepalive_seconds=env_float(env, "STREAM_KEEPALIVE_SECONDS", 0.1, 3600.0),
            stream_port=env_int(env, "STREAM_PORT", 1, 65535),
            request_queue_timeout=env_float(env, "REQUEST_QUEUE_TIMEOUT_SECONDS", 0.1, 3600.0),
            stream_url=_stream_url(env),
            stream_max_per_client=env_int(env, "STREAM_MAX_PER_CLIENT", 1, 10_000),
            stream_max_connections=env_int(env, "STREAM_MAX_CONNECTIONS", 1, 1_000_000),
            metrics_dir=env.get("PROMETHEUS_MULTIPROC_DIR", "").strip(),
            rate_limit_per_minute=env_int(env, "RATE_LIMIT_PER_MINUTE", 0, 1_000_000),
            auth_failures_per_minute=env_int(env, "AUTH_FAILURES_PER_MINUTE", 0, 1_000_000),
            admin_token=admin_token,
            allowed_hosts=allowed,
            stuck_seconds=env_float(env, "ORDER_STUCK_SECONDS", 1.0, 86400.0),
            reconcile_interval=_interval(env, "RECONCILE_INTERVAL_SECONDS"),
            reconcile_after=env_float(env, "RECONCILE_AFTER_SECONDS", 1.0, 86400.0),
            reconcile_batch=env_int(env, "RECONCILE_BATCH", 1, 100_000),
        )
