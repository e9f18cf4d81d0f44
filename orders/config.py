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
    EnvVar("REDIS_CONNECT_ATTEMPTS", "5", "Connection attempts at start before exit 1."),
    EnvVar("REDIS_CONNECT_RETRY_DELAY", "5.0", "Seconds between connection attempts."),
    EnvVar("PATTERN", "both", "pubsub, queue or both: how messages and events are emitted."),
    EnvVar("PUBLISH_INTERVAL", "2.0", "Seconds between two Hello messages."),
    EnvVar("LOG_FORMAT", "text", "text (the original '[timestamp] line') or json."),
    EnvVar("LOG_LEVEL", "INFO", "Python logging level."),
    # --- orders service (orders-api, orders-relay) ---
    # --- consumers (payment, invoice, email workers) ---
)
"""The documented variables. Later features append theirs here, nowhere else."""

_DEFAULTS = {var.name: var.default for var in ENV_VARS}


def _get(env: Mapping[str, str], name: str) -> str:
    return env.get(name, _DEFAULTS[name]).strip()


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
            raise ConfigError(
                f"invalid REDIS_URL {redis_url!r}: must start with redis://, rediss:// or unix://"
            )
        host = _get(env, "REDIS_HOST")
        if not host:
            raise ConfigError("invalid REDIS_HOST '': must not be empty")
        return cls(
            redis_host=host,
            redis_port=_int(env, "REDIS_PORT", 1, 65535),
            redis_url=redis_url,
            redis_connect_attempts=_int(env, "REDIS_CONNECT_ATTEMPTS", 1, 1000),
            redis_connect_retry_delay=_float(env, "REDIS_CONNECT_RETRY_DELAY", 0.0, 3600.0),
            pattern=parse_pattern(_get(env, "PATTERN")),
            publish_interval=_float(env, "PUBLISH_INTERVAL", 0.001, 86400.0),
            log_format=_choice(env, "LOG_FORMAT", ("text", "json")),
            log_level=_choice(env, "LOG_LEVEL", ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")),
        )


def settings_fields() -> list[str]:
    """Names of the Settings fields (used by tests to check ENV_VARS is complete)."""
    return [f.name for f in fields(Settings)]
