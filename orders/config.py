"""Every environment variable of every Python process, in one place.

Configuration is read once at start into a frozen :class:`Settings`. An invalid value
raises :class:`ConfigError` with a one-line message; entry points print it and exit
with :data:`EXIT_BAD_CONFIG`. The table :data:`ENV_VARS` is the documentation: the
README's configuration table is generated from the same names and defaults, and a
test checks that docker-compose.yml passes only variables listed here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Literal

EXIT_OK = 0
EXIT_NO_REDIS = 1
"""Could not reach Redis after all attempts (as the original publisher)."""
EXIT_BAD_CONFIG = 2
"""An environment variable has an invalid value."""

Pattern = Literal["pubsub", "queue", "both"]
PATTERNS: tuple[Pattern, ...] = ("pubsub", "queue", "both")


class ConfigError(ValueError):
    """An environment variable has a value we cannot use. The message is one line."""


@dataclass(frozen=True)
class EnvVar:
    """One documented environment variable."""

    name: str
    default: str
    doc: str


ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar("REDIS_HOST", "localhost", "Redis host (ignored when REDIS_URL is set)."),
    EnvVar("REDIS_PORT", "6379", "Redis port (ignored when REDIS_URL is set)."),
    EnvVar("REDIS_URL", "", "Full Redis URL (redis:// or rediss://, user, password, db)."),
    EnvVar(
        "REDIS_TLS_CA_FILE",
        "",
        "PEM CA bundle verifying the server's certificate with rediss:// (empty: system CAs).",
    ),
    EnvVar("REDIS_CONNECT_ATTEMPTS", "5", "Connection attempts at start before exit 1."),
    EnvVar("REDIS_CONNECT_RETRY_DELAY", "5.0", "Seconds between connection attempts."),
    EnvVar(
        "REDIS_CLUSTER", "0", "1: Redis Cluster; REDIS_URL or REDIS_HOST:PORT is one seed node."
    ),
    EnvVar(
        "REDIS_WAIT_REPLICAS", "0", "Replicas that must ack each published event (WAIT); 0: none."
    ),
    EnvVar("PATTERN", "both", "pubsub, queue or both: how messages and events are emitted."),
    EnvVar("PUBLISH_INTERVAL", "2.0", "Seconds between two Hello messages."),
    EnvVar("LOG_FORMAT", "text", "text (the original '[timestamp] line') or json."),
    EnvVar("LOG_LEVEL", "INFO", "Python logging level."),
    # --- orders service (orders-api, orders-relay) ---
    EnvVar("DATABASE_URL", "sqlite:///var/orders.db", "sqlite:///path or postgresql+psycopg://."),
    EnvVar("HOST", "127.0.0.1", "orders-api listen address (compose sets 0.0.0.0)."),
    EnvVar("PORT", "8000", "orders-api listen port."),
    EnvVar("WEB_CONCURRENCY", "2", "orders-api gunicorn worker processes."),
    EnvVar(
        "WEB_THREADS", "8", "Threads per orders-api worker (gthread; a dashboard stream holds one)."
    ),
    EnvVar("MAX_BODY_BYTES", "65536", "Largest accepted request body; larger is 413."),
    EnvVar("MAX_LINES", "100", "Most lines (items) in one order."),
    EnvVar(
        "RATE_LIMIT_PER_MINUTE",
        "600",
        "orders-api requests per client IP per minute (token bucket in Redis); 0 = off.",
    ),
    EnvVar("RELAY_IN_PROCESS", "1", "1: each orders-api worker runs an outbox relay thread."),
    EnvVar("RELAY_INTERVAL", "0.5", "Seconds between two outbox polls of the relay."),
    EnvVar("RELAY_BATCH", "100", "Most outbox rows the relay publishes per poll."),
    EnvVar("RELAY_CLAIM_SECONDS", "15", "Seconds a claimed outbox row is reserved."),
    # --- consumers (payment, invoice, email workers) ---
    EnvVar("CONSUMER_CONCURRENCY", "1", "Handler threads per consumer process (--concurrency)."),
    EnvVar("CONSUMER_BATCH_SIZE", "10", "Messages a worker thread takes and acks per round trip."),
    EnvVar("CONSUMER_MAX_ATTEMPTS", "5", "Failed attempts before a message is dead-lettered."),
    EnvVar("CONSUMER_BACKOFF_BASE", "1.0", "Seconds of the first retry delay (doubles each time)."),
    EnvVar("CONSUMER_BACKOFF_MAX", "60.0", "Cap of the retry delay in seconds (full jitter)."),
    EnvVar("CONSUMER_HEARTBEAT_TTL", "10", "Seconds a worker's heartbeat lives; gone = reaped."),
    EnvVar("PAYMENT_DECLINE_RATE", "0.0", "Share of payments the simulated gateway declines."),
    EnvVar("PAYMENT_TRANSIENT_ERROR_RATE", "0.0", "Share of gateway calls that fail transiently."),
    EnvVar("PAYMENT_LATENCY_MS", "0", "Simulated gateway latency per call, in milliseconds."),
    EnvVar("PAYMENT_SEED", "", "Seed making gateway decisions deterministic per event."),
    EnvVar("PAYMENT_FLAKY_CALLS", "2", "Calls that fail transiently for flaky@example.com."),
    EnvVar("SMTP_HOST", "localhost", "SMTP server the email consumer sends to (smtp-sink binds)."),
    EnvVar("SMTP_PORT", "1025", "SMTP port (the email consumer's target, smtp-sink's listen)."),
    EnvVar("SMTP_TIMEOUT", "10.0", "Seconds before an SMTP connection or command times out."),
    EnvVar("EMAIL_FROM", "orders@example.com", "From address of confirmation emails."),
    EnvVar("SMTP_SINK_DIR", "var/mail", "Where smtp-sink stores each message as a .eml file."),
    # --- dashboard, metrics, admin ---
    EnvVar("METRICS_PORT", "0", "Consumer: serve Prometheus metrics on this port (0 = off)."),
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
)
"""The documented variables. Later features append theirs here, nowhere else."""

_DEFAULTS = {var.name: var.default for var in ENV_VARS}


def _get(env: Mapping[str, str], name: str) -> str:
    # An empty value means the default (compose's `VAR: ${VAR:-}` and `VAR=` in a
    # shell both produce one); the Go subscriber reads its variables the same way.
    return env.get(name, "").strip() or _DEFAULTS[name]


def _int(env: Mapping[str, str], name: str, low: int, high: int) -> int:
    raw = _get(env, name)
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"invalid {name} {raw!r}: must be an integer") from None
    if not low <= value <= high:
        raise ConfigError(f"invalid {name} {raw!r}: must be between {low} and {high}")
    return value


def _float(env: Mapping[str, str], name: str, low: float, high: float) -> float:
    raw = _get(env, name)
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"invalid {name} {raw!r}: must be a number of seconds") from None
    if not low <= value <= high:  # also rejects nan
        raise ConfigError(f"invalid {name} {raw!r}: must be between {low} and {high}")
    return value


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    raw = _get(env, name)
    if raw not in choices:
        raise ConfigError(f"invalid {name} {raw!r}: must be {', '.join(choices)}")
    return raw


def parse_pattern(raw: str) -> Pattern:
    """Validate a PATTERN value (exact, lower case, as the original accepted)."""
    value = raw.strip()
    if value not in PATTERNS:
        raise ConfigError(f"invalid PATTERN {raw!r}: must be pubsub, queue or both")
    return value  # type: ignore[return-value]


def _turns_verification_off(redis_url: str) -> bool:
    """True if a rediss:// URL's query asks redis-py not to check the server's name."""
    from urllib.parse import parse_qs, urlsplit

    query = parse_qs(urlsplit(redis_url).query, keep_blank_values=True)
    values = query.get("ssl_check_hostname", [])  # redis-py reads an empty value as off
    return any(v.strip().lower() in ("", "0", "f", "false", "n", "no", "off") for v in values)


@dataclass(frozen=True)
class Settings:
    """The configuration of a process, read once from the environment."""

    redis_host: str
    redis_port: int
    redis_url: str
    redis_connect_attempts: int
    redis_connect_retry_delay: float
    pattern: Pattern
    publish_interval: float
    log_format: str
    log_level: str
    redis_cluster: bool = False
    """REDIS_CLUSTER=1: talk to a Redis Cluster (docs/cluster.md)."""
    redis_wait_replicas: int = 0
    """REDIS_WAIT_REPLICAS: publishes WAIT for this many replicas (0: do not wait)."""
    redis_tls_ca_file: str = ""
    """REDIS_TLS_CA_FILE: CA certificates (PEM) that verify a rediss:// server; empty:
    the system's. Verification (certificate and host name) is always on."""

    @property
    def publishes(self) -> bool:
        """True if the pattern includes pub/sub."""
        return self.pattern in ("pubsub", "both")

    @property
    def queues(self) -> bool:
        """True if the pattern includes queues."""
        return self.pattern in ("queue", "both")

    @property
    def redis_location(self) -> str:
        """host:port for log lines (the URL without credentials when REDIS_URL is set)."""
        if self.redis_url:
            from urllib.parse import urlsplit

            parts = urlsplit(self.redis_url)
            return f"{parts.hostname}:{parts.port or 6379}"
        return f"{self.redis_host}:{self.redis_port}"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every variable; raise ConfigError on the first bad one."""
        env = os.environ if env is None else env
        redis_url = _get(env, "REDIS_URL")
        if redis_url and not redis_url.startswith(("redis://", "rediss://", "unix://")):
            scheme = redis_url.split("://", 1)[0] if "://" in redis_url else "(none)"
            raise ConfigError(  # only the scheme: the rest of the URL may hold a password
                f"invalid REDIS_URL scheme {scheme!r}: must start with redis://, rediss:// or unix://"
            )
        if redis_url.startswith("rediss://") and _turns_verification_off(redis_url):
            raise ConfigError(  # no URL in the message: it may hold a password
                "invalid REDIS_URL: TLS verification cannot be turned off (ssl_check_hostname)"
            )
        redis_tls_ca_file = _get(env, "REDIS_TLS_CA_FILE")
        if redis_tls_ca_file and not redis_url.startswith("rediss://"):
            # Never a silent plain-text connection to a server the user meant to verify.
            raise ConfigError(
                f"invalid REDIS_TLS_CA_FILE {redis_tls_ca_file!r}: needs a rediss:// REDIS_URL"
            )
        if redis_tls_ca_file and not os.path.isfile(redis_tls_ca_file):
            raise ConfigError(f"invalid REDIS_TLS_CA_FILE {redis_tls_ca_file!r}: no such file")
        return cls(
            redis_host=_get(env, "REDIS_HOST"),
            redis_port=_int(env, "REDIS_PORT", 1, 65535),
            redis_url=redis_url,
            redis_connect_attempts=_int(env, "REDIS_CONNECT_ATTEMPTS", 1, 1000),
            redis_connect_retry_delay=_float(env, "REDIS_CONNECT_RETRY_DELAY", 0.0, 3600.0),
            pattern=parse_pattern(_get(env, "PATTERN")),
            publish_interval=_float(env, "PUBLISH_INTERVAL", 0.001, 86400.0),
            log_format=_choice(env, "LOG_FORMAT", ("text", "json")),
            log_level=_choice(env, "LOG_LEVEL", ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")),
            redis_cluster=_choice(env, "REDIS_CLUSTER", ("0", "1")) == "1",
            redis_wait_replicas=_int(env, "REDIS_WAIT_REPLICAS", 0, 16),
            redis_tls_ca_file=redis_tls_ca_file,
        )


def settings_fields() -> list[str]:
    """Names of the Settings fields (used by tests to check ENV_VARS is complete)."""
    return [f.name for f in fields(Settings)]


_DATABASE_SCHEMES = ("sqlite://", "postgresql+psycopg://", "postgresql://")


def _database_url(env: Mapping[str, str]) -> str:
    raw = _get(env, "DATABASE_URL")
    if not raw.startswith(_DATABASE_SCHEMES):
        raise ConfigError(
            f"invalid DATABASE_URL {raw!r}: must start with sqlite:/// or postgresql+psycopg://"
        )
    if raw.startswith("postgresql://"):
        # psycopg 3 is the driver we ship; SQLAlchemy's bare scheme means psycopg2.
        raw = "postgresql+psycopg://" + raw.removeprefix("postgresql://")
    return raw


def _stream_url(env: Mapping[str, str]) -> str:
    raw = _get(env, "STREAM_URL")
    if raw and not raw.startswith(("http://", "https://", "/")):
        raise ConfigError(
            f"invalid STREAM_URL {raw!r}: must be an http(s):// URL or a path starting with /"
        )
    return raw


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
    stream_url: str = ""
    """STREAM_URL: the page's EventSource URL; empty: same host, STREAM_PORT."""
    stream_max_per_client: int = 8
    stream_max_connections: int = 2000
    metrics_dir: str = ""
    rate_limit_per_minute: int = 600
    """RATE_LIMIT_PER_MINUTE: per client IP (burst of the same size); 0 turns it off."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OrderServiceSettings:
        """Read and validate every variable; raise ConfigError on the first bad one."""
        env = os.environ if env is None else env
        host = _get(env, "HOST")
        if not host:
            raise ConfigError("invalid HOST '': must not be empty")
        return cls(
            base=Settings.from_env(env),
            database_url=_database_url(env),
            host=host,
            port=_int(env, "PORT", 1, 65535),
            web_concurrency=_int(env, "WEB_CONCURRENCY", 1, 64),
            web_threads=_int(env, "WEB_THREADS", 1, 64),
            max_body_bytes=_int(env, "MAX_BODY_BYTES", 1024, 16 * 1024 * 1024),
            max_lines=_int(env, "MAX_LINES", 1, 1000),
            relay_in_process=_choice(env, "RELAY_IN_PROCESS", ("0", "1")) == "1",
            relay_interval=_float(env, "RELAY_INTERVAL", 0.01, 3600.0),
            relay_batch=_int(env, "RELAY_BATCH", 1, 10000),
            relay_claim_seconds=_float(env, "RELAY_CLAIM_SECONDS", 1.0, 3600.0),
            stream_max_seconds=_float(env, "STREAM_MAX_SECONDS", 1.0, 86400.0),
            stream_keepalive_seconds=_float(env, "STREAM_KEEPALIVE_SECONDS", 0.1, 3600.0),
            stream_port=_int(env, "STREAM_PORT", 1, 65535),
            stream_url=_stream_url(env),
            stream_max_per_client=_int(env, "STREAM_MAX_PER_CLIENT", 1, 10_000),
            stream_max_connections=_int(env, "STREAM_MAX_CONNECTIONS", 1, 1_000_000),
            metrics_dir=env.get("PROMETHEUS_MULTIPROC_DIR", "").strip(),
            rate_limit_per_minute=_int(env, "RATE_LIMIT_PER_MINUTE", 0, 1_000_000),
        )


@dataclass(frozen=True)
class ConsumerSettings:
    """The configuration of a consumer process (payment, invoice, email, updates)."""

    base: Settings
    database_url: str
    concurrency: int
    batch_size: int
    max_attempts: int
    backoff_base: float
    backoff_max: float
    heartbeat_ttl: int
    payment_decline_rate: float
    payment_transient_error_rate: float
    payment_latency_ms: int
    payment_seed: str
    payment_flaky_calls: int
    smtp_host: str
    smtp_port: int
    smtp_timeout: float
    email_from: str
    smtp_sink_dir: str
    metrics_port: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ConsumerSettings:
        """Read and validate every variable; raise ConfigError on the first bad one."""
        env = os.environ if env is None else env
        base = Settings.from_env(env)
        database_url = _get(env, "DATABASE_URL")
        if not database_url.startswith(("sqlite://", "postgresql")):
            raise ConfigError(
                f"invalid DATABASE_URL {database_url!r}: must start with sqlite:// or postgresql"
            )
        email_from = _get(env, "EMAIL_FROM")
        if "@" not in email_from:
            raise ConfigError(f"invalid EMAIL_FROM {email_from!r}: must be an email address")
        smtp_host = _get(env, "SMTP_HOST")
        if not smtp_host:
            raise ConfigError("invalid SMTP_HOST '': must not be empty")
        return cls(
            base=base,
            database_url=database_url,
            concurrency=_int(env, "CONSUMER_CONCURRENCY", 1, 256),
            batch_size=_int(env, "CONSUMER_BATCH_SIZE", 1, 1000),
            max_attempts=_int(env, "CONSUMER_MAX_ATTEMPTS", 1, 100),
            backoff_base=_float(env, "CONSUMER_BACKOFF_BASE", 0.0, 3600.0),
            backoff_max=_float(env, "CONSUMER_BACKOFF_MAX", 0.0, 86400.0),
            heartbeat_ttl=_int(env, "CONSUMER_HEARTBEAT_TTL", 1, 3600),
            payment_decline_rate=_float(env, "PAYMENT_DECLINE_RATE", 0.0, 1.0),
            payment_transient_error_rate=_float(env, "PAYMENT_TRANSIENT_ERROR_RATE", 0.0, 1.0),
            payment_latency_ms=_int(env, "PAYMENT_LATENCY_MS", 0, 600_000),
            payment_seed=_get(env, "PAYMENT_SEED"),
            payment_flaky_calls=_int(env, "PAYMENT_FLAKY_CALLS", 0, 100),
            smtp_host=smtp_host,
            smtp_port=_int(env, "SMTP_PORT", 1, 65535),
            smtp_timeout=_float(env, "SMTP_TIMEOUT", 0.1, 600.0),
            email_from=email_from,
            smtp_sink_dir=_get(env, "SMTP_SINK_DIR") or "var/mail",
            metrics_port=_int(env, "METRICS_PORT", 0, 65535),
        )


def markdown_table() -> str:
    """The README's configuration table, generated from :data:`ENV_VARS`.

    ``python -m orders.config`` prints it; a test keeps the README's copy in step.
    """
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for var in ENV_VARS:
        default = f"`{var.default}`" if var.default else "(empty)"
        rows.append(f"| `{var.name}` | {default} | {var.doc.replace('|', '/')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
