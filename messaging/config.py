"""Configuration primitives every process shares, and the settings they all read.

Each process reads its configuration once at start into a frozen settings object. An
invalid value raises :class:`ConfigError` with a one-line message; entry points print
it and exit with :data:`EXIT_BAD_CONFIG`. Every variable is declared once, as an
:class:`EnvVar` with its default and meaning: the variables every process reads are
:data:`ENV_VARS` here; each service declares its own next to its settings class
(``orders.config``, ``consumers.config``). The README's configuration table is
generated from those declarations (``python -m devtools.envdoc``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Literal, NoReturn, TypeVar

EXIT_OK = 0
EXIT_NO_REDIS = 1
"""Could not reach Redis after all attempts (as the original publisher)."""
EXIT_BAD_CONFIG = 2
"""An environment variable has an invalid value."""

Pattern = Literal["pubsub", "queue", "both"]
PATTERNS: tuple[Pattern, ...] = ("pubsub", "queue", "both")


class ConfigError(ValueError):
    """An environment variable has a value we cannot use. The message is one line."""


# --- the start of every console script ----------------------------------------------------

_ENV_EPILOG = (
    "Configuration: environment variables only; the README's Configuration table "
    "lists each with its default."
)

_S = TypeVar("_S")


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are bad configuration: one line on stderr, exit 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``prog: message`` (no usage block) and exit :data:`EXIT_BAD_CONFIG`."""
        print(f"{self.prog}: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_CONFIG)


def command_line(prog: str, description: str | None) -> OneLineParser:
    """The parser of a console script: its description as written, and where config lives.

    Parse it before anything else happens, so ``--help`` prints and exits without
    starting a service, opening a database or connecting to Redis.
    """
    return OneLineParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_ENV_EPILOG,
    )


def arg_int(low: int, high: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer within [low, high].

    Anything else is the parser's one-line usage error (exit 2), never a traceback
    further on (an id SQLite cannot bind, a count Redis refuses).
    """

    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{raw!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{raw!r} is not between {low} and {high}")
        return value

    return parse


def arg_seconds(low: float, high: float) -> Callable[[str], float]:
    """An argparse ``type``: a number of seconds within [low, high] (``nan`` and ``inf``
    are not: a sleep or a date that far away fails later, with a traceback)."""

    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{raw!r} is not a number of seconds") from None
        if not low <= value <= high:  # also refuses nan
            raise argparse.ArgumentTypeError(f"{raw!r} is not between {low:.15g} and {high:.15g}")
        return value

    return parse


def load_settings(prog: str, load: Callable[[], _S]) -> _S:
    """``load()`` the process's settings; a :class:`ConfigError` ends the process.

    The one way every console script refuses bad configuration: ``prog: <what was
    wrong>`` as one line on stderr, then exit :data:`EXIT_BAD_CONFIG` (``SystemExit``,
    as argparse does for a bad argument).
    """
    try:
        return load()
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_CONFIG) from None


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
    EnvVar(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "",
        "OTLP/HTTP base URL (e.g. http://localhost:4318): export OpenTelemetry spans to "
        "<URL>/v1/traces; empty: trace context still travels in envelopes, nothing exported.",
    ),
    EnvVar(
        "OTEL_SERVICE_NAME",
        "",
        "The spans' service.name; empty: the process's name (orders-api, payment-service, ...).",
    ),
    EnvVar(
        "OTEL_SDK_DISABLED",
        "false",
        "true: no OpenTelemetry SDK at all: no spans, no new trace context (a caller's passes "
        "through); false: as OTEL_EXPORTER_OTLP_ENDPOINT says.",
    ),
    EnvVar(
        "FAULT_POINT",
        "",
        "Tests only: name:exit or name:raise fails at a named crash window "
        "(messaging/faults.py); empty: off.",
    ),
)
"""The variables every process reads (Redis, PATTERN, logging). Each service declares
its own beside its settings class; :func:`markdown_table` renders any of them."""


_DEFAULTS: dict[str, str] = {}
"""Name -> default of every declared variable (filled by :func:`declare`)."""


def declared_names() -> set[str]:
    """Names of every variable declared so far (by the modules imported)."""
    return set(_DEFAULTS)


def declare(*variables: EnvVar) -> tuple[EnvVar, ...]:
    """Register variables (name, default, doc) so :func:`env_str` knows their defaults."""
    for var in variables:
        if _DEFAULTS.get(var.name, var.default) != var.default:
            raise ValueError(f"{var.name} declared twice with different defaults")
        _DEFAULTS[var.name] = var.default
    return variables


declare(*ENV_VARS)


def env_str(env: Mapping[str, str], name: str) -> str:
    """The value of a declared variable; empty or unset means its default."""
    # An empty value means the default (compose's `VAR: ${VAR:-}` and `VAR=` in a
    # shell both produce one); the Go subscriber reads its variables the same way.
    return env.get(name, "").strip() or _DEFAULTS[name]


def env_int(env: Mapping[str, str], name: str, low: int, high: int) -> int:
    """An integer variable within [low, high]."""
    raw = env_str(env, name)
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"invalid {name} {raw!r}: must be an integer") from None
    if not low <= value <= high:
        raise ConfigError(f"invalid {name} {raw!r}: must be between {low} and {high}")
    return value


def env_float(env: Mapping[str, str], name: str, low: float, high: float) -> float:
    """A number of seconds within [low, high]."""
    raw = env_str(env, name)
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"invalid {name} {raw!r}: must be a number of seconds") from None
    if not low <= value <= high:  # also rejects nan
        raise ConfigError(f"invalid {name} {raw!r}: must be between {low} and {high}")
    return value


def env_choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    """One of ``choices``, exactly."""
    raw = env_str(env, name)
    if raw not in choices:
        raise ConfigError(f"invalid {name} {raw!r}: must be {', '.join(choices)}")
    return raw


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
"""LOG_LEVEL's values, in any case (``info`` is ``INFO``, as Python's logging reads them)."""


def _log_level(env: Mapping[str, str]) -> str:
    raw = env_str(env, "LOG_LEVEL")
    if raw.upper() not in LOG_LEVELS:
        choices = ", ".join(LOG_LEVELS)
        raise ConfigError(f"invalid LOG_LEVEL {raw!r}: must be one of {choices} (any case)")
    return raw.upper()


def _otel_endpoint(env: Mapping[str, str]) -> str:
    raw = env_str(env, "OTEL_EXPORTER_OTLP_ENDPOINT")
    if not raw:
        return ""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(raw)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        valid = False
    if not valid:  # only the scheme: the rest may hold a token
        scheme = raw.split("://", 1)[0] if "://" in raw else "(none)"
        raise ConfigError(
            f"invalid OTEL_EXPORTER_OTLP_ENDPOINT (scheme {scheme!r}): must be an http:// or "
            "https:// URL with a host, e.g. http://localhost:4318"
        )
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
    otel_endpoint: str = ""
    """OTEL_EXPORTER_OTLP_ENDPOINT: where spans are exported (empty: nowhere)."""
    otel_service_name: str = ""
    """OTEL_SERVICE_NAME: the spans' service.name (empty: the process's own name)."""
    otel_sdk_disabled: bool = False
    """OTEL_SDK_DISABLED=true: OpenTelemetry's no-op tracer, no SDK (messaging.tracing)."""

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
        redis_url = env_str(env, "REDIS_URL")
        if redis_url and not redis_url.startswith(("redis://", "rediss://", "unix://")):
            scheme = redis_url.split("://", 1)[0] if "://" in redis_url else "(none)"
            raise ConfigError(  # only the scheme: the rest of the URL may hold a password
                f"invalid REDIS_URL scheme {scheme!r}: must start with redis://, rediss:// or unix://"
            )
        if redis_url:
            _check_redis_url(redis_url)
        if redis_url.startswith("rediss://") and _turns_verification_off(redis_url):
            raise ConfigError(  # no URL in the message: it may hold a password
                "invalid REDIS_URL: TLS verification cannot be turned off (ssl_check_hostname)"
            )
        redis_tls_ca_file = env_str(env, "REDIS_TLS_CA_FILE")
        if redis_tls_ca_file and not redis_url.startswith("rediss://"):
            # Never a silent plain-text connection to a server the user meant to verify.
            raise ConfigError(
                f"invalid REDIS_TLS_CA_FILE {redis_tls_ca_file!r}: needs a rediss:// REDIS_URL"
            )
        if redis_tls_ca_file and not os.path.isfile(redis_tls_ca_file):
            raise ConfigError(f"invalid REDIS_TLS_CA_FILE {redis_tls_ca_file!r}: no such file")
        return cls(
            redis_host=env_str(env, "REDIS_HOST"),
            redis_port=env_int(env, "REDIS_PORT", 1, 65535),
            redis_url=redis_url,
            redis_connect_attempts=env_int(env, "REDIS_CONNECT_ATTEMPTS", 1, 1000),
            redis_connect_retry_delay=env_float(env, "REDIS_CONNECT_RETRY_DELAY", 0.0, 3600.0),
            pattern=parse_pattern(env_str(env, "PATTERN")),
            publish_interval=env_float(env, "PUBLISH_INTERVAL", 0.001, 86400.0),
            log_format=env_choice(env, "LOG_FORMAT", ("text", "json")),
            log_level=_log_level(env),
            redis_cluster=env_choice(env, "REDIS_CLUSTER", ("0", "1")) == "1",
            redis_wait_replicas=env_int(env, "REDIS_WAIT_REPLICAS", 0, 16),
            redis_tls_ca_file=redis_tls_ca_file,
            otel_endpoint=_otel_endpoint(env),
            otel_service_name=env_str(env, "OTEL_SERVICE_NAME"),
            otel_sdk_disabled=env_choice(env, "OTEL_SDK_DISABLED", ("false", "true")) == "true",
        )


def _check_redis_url(url: str) -> None:
    """REDIS_URL as redis-py will read it, checked now: one line at start instead of a
    traceback at the first connection (a port past 65535, an option that is not a
    number, a broken IPv6 address), and a database that is not a number, which
    redis-py drops without a word (``redis://host/orders`` would be database 0).
    The message never quotes the URL: it may hold a password."""
    from urllib.parse import urlsplit

    from redis.connection import parse_url

    try:
        parse_url(url)
        parts = urlsplit(url)
        parts.port  # noqa: B018 - urlsplit checks the port only when asked
    except ValueError as exc:
        raise ConfigError(f"invalid REDIS_URL: {exc}") from None
    database = parts.path.strip("/")
    if url.startswith(("redis://", "rediss://")) and database and not database.isdigit():
        raise ConfigError(
            f"invalid REDIS_URL: the database {database[:40]!r} after the host must be a"
            " number (redis://host:6379/0)"
        )
    if parts.port == 0:
        raise ConfigError("invalid REDIS_URL: port 0")


def settings_fields() -> list[str]:
    """Names of the Settings fields (used by tests to check ENV_VARS is complete)."""
    return [f.name for f in fields(Settings)]


WORKER_ENV_VARS: tuple[EnvVar, ...] = declare(
    EnvVar("CONSUMER_CONCURRENCY", "1", "Handler threads per consumer process (--concurrency)."),
    EnvVar("CONSUMER_BATCH_SIZE", "10", "Messages a worker thread takes and acks per round trip."),
    EnvVar(
        "CONSUMER_MAX_ATTEMPTS",
        "5",
        "Failed attempts before a message is dead-lettered (unexpected errors; a transient "
        "one has CONSUMER_RETRY_SECONDS, a permanent one is dead-lettered at once).",
    ),
    EnvVar(
        "CONSUMER_RETRY_SECONDS",
        "3600",
        "Seconds a transient failure (connection refused, timeout, SMTP 4xx, database "
        "away) is retried, from the message's first failure, before it is dead-lettered.",
    ),
    EnvVar(
        "CONSUMER_REVIVE_SECONDS",
        "60",
        "Wait before a transient dead letter is tried again by itself; doubles each time "
        "it fails again (up to CONSUMER_RETRY_SECONDS), but one letter is tried at least "
        "this often; once one succeeds, the rest follow at CONSUMER_REVIVE_RATE.",
    ),
    EnvVar(
        "CONSUMER_REVIVE_RATE",
        "10",
        "Transient dead letters put back on their queue per second, at most (per queue).",
    ),
    EnvVar(
        "CONSUMER_MAX_CRASHES",
        "5",
        "Workers a message may kill (die holding it) before it is dead-lettered.",
    ),
    EnvVar("CONSUMER_BACKOFF_BASE", "1.0", "Seconds of the first retry delay (doubles each time)."),
    EnvVar("CONSUMER_BACKOFF_MAX", "60.0", "Cap of the retry delay in seconds (full jitter)."),
    EnvVar("CONSUMER_HEARTBEAT_TTL", "10", "Seconds a worker's heartbeat lives; gone = reaped."),
    EnvVar(
        "CONSUMER_EXPRESS_RATIO",
        "10",
        "Express messages taken in a row while standard work waits before one standard one.",
    ),
    EnvVar(
        "CONSUMER_STUCK_SECONDS",
        "300",
        "One message holding a handler thread this long: the worker gives up and exits 3.",
    ),
    EnvVar("METRICS_PORT", "0", "Consumer: serve Prometheus metrics on this port (0 = off)."),
)
"""The variables of every queue worker process (the consumers and orders-updates)."""


@dataclass(frozen=True)
class WorkerSettings:
    """The worker runtime's configuration (:mod:`messaging.worker`, :mod:`messaging.runner`)."""

    base: Settings
    concurrency: int
    batch_size: int
    max_attempts: int
    backoff_base: float
    backoff_max: float
    heartbeat_ttl: int
    stuck_seconds: float = 300.0
    max_crashes: int = 5
    metrics_port: int = 0
    express_ratio: int = 10
    retry_seconds: float = 3600.0
    revive_seconds: float = 60.0
    revive_rate: int = 10

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerSettings:
        """Read and validate every variable; raise ConfigError on the first bad one."""
        env = os.environ if env is None else env
        return cls(
            base=Settings.from_env(env),
            concurrency=env_int(env, "CONSUMER_CONCURRENCY", 1, 256),
            batch_size=env_int(env, "CONSUMER_BATCH_SIZE", 1, 1000),
            max_attempts=env_int(env, "CONSUMER_MAX_ATTEMPTS", 1, 100),
            backoff_base=env_float(env, "CONSUMER_BACKOFF_BASE", 0.0, 3600.0),
            backoff_max=env_float(env, "CONSUMER_BACKOFF_MAX", 0.0, 86400.0),
            heartbeat_ttl=env_int(env, "CONSUMER_HEARTBEAT_TTL", 1, 3600),
            stuck_seconds=env_float(env, "CONSUMER_STUCK_SECONDS", 1.0, 86400.0),
            max_crashes=env_int(env, "CONSUMER_MAX_CRASHES", 1, 1000),
            metrics_port=env_int(env, "METRICS_PORT", 0, 65535),
            express_ratio=env_int(env, "CONSUMER_EXPRESS_RATIO", 1, 1_000_000),
            retry_seconds=env_float(env, "CONSUMER_RETRY_SECONDS", 0.0, 30 * 86400.0),
            revive_seconds=env_float(env, "CONSUMER_REVIVE_SECONDS", 0.1, 30 * 86400.0),
            revive_rate=env_int(env, "CONSUMER_REVIVE_RATE", 1, 100_000),
        )


_DATABASE_SCHEMES = ("sqlite://", "postgresql+psycopg://", "postgresql://")


def _sqlite_in_memory(url: str) -> bool:
    """Whether a sqlite URL names no file: ``sqlite://``, ``sqlite:///``,
    ``sqlite:///:memory:``, or a URI filename with ``mode=memory``."""
    if not url.startswith("sqlite:///"):
        return True  # sqlite:// and sqlite://host...: SQLAlchemy opens memory
    path, _, query = url.removeprefix("sqlite:///").partition("?")
    return (
        path in ("", ":memory:")
        or path.startswith("file::memory:")
        or any(part.lower() == "mode=memory" for part in query.split("&"))
    )


def database_url(env: Mapping[str, str], name: str) -> str:
    """A database URL variable: sqlite:/// or PostgreSQL (normalised to psycopg 3)."""
    raw = env_str(env, name)
    if not raw.startswith(_DATABASE_SCHEMES):
        raise ConfigError(
            f"invalid {name} {raw!r}: must start with sqlite:/// or postgresql+psycopg://"
        )
    if raw.startswith("sqlite:") and _sqlite_in_memory(raw):
        raise ConfigError(
            f"invalid {name} {raw!r}: an in-memory SQLite database lives and dies with one"
            " connection (every thread and process would get its own, empty one); give a"
            " file, e.g. sqlite:///var/orders.db"
        )
    if raw.startswith("postgresql://"):
        # psycopg 3 is the driver we ship; SQLAlchemy's bare scheme means psycopg2.
        raw = "postgresql+psycopg://" + raw.removeprefix("postgresql://")
    return raw


def markdown_table(variables: tuple[EnvVar, ...]) -> str:
    """A Markdown table of variables (the README's is built by ``devtools.envdoc``)."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for var in variables:
        default = f"`{var.default}`" if var.default else "(empty)"
        rows.append(f"| `{var.name}` | {default} | {var.doc.replace('|', '/')} |")
    return "\n".join(rows)
