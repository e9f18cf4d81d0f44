"""The one place that builds clients from settings.

Nothing connects at import time: entry points call these functions after reading
their :class:`~orders.config.Settings`.
"""

from __future__ import annotations

import logging
import threading

import redis

from orders.config import Settings

log = logging.getLogger(__name__)


def redis_client(settings: Settings, **overrides: object) -> redis.Redis:
    """A Redis client for the configured server (REDIS_URL wins over host/port)."""
    options: dict[str, object] = {
        "decode_responses": True,
        "socket_connect_timeout": 5,
        "socket_timeout": 5,
        "health_check_interval": 30,
    }
    options.update(overrides)
    if settings.redis_url:
        return redis.Redis.from_url(settings.redis_url, **options)  # type: ignore[arg-type]
    return redis.Redis(host=settings.redis_host, port=settings.redis_port, **options)  # type: ignore[arg-type]


def connect_with_retries(
    client: redis.Redis, settings: Settings, stop: threading.Event | None = None
) -> bool:
    """PING until it answers, as the original did: N attempts, a fixed delay apart.

    Returns False when every attempt failed or ``stop`` was set while waiting. The log
    lines are the original publisher's, word for word.
    """
    attempts = settings.redis_connect_attempts
    for attempt in range(1, attempts + 1):
        try:
            client.ping()
        except redis.RedisError as exc:
            log.info("Failed to connect to Redis: %s", exc)
        else:
            log.info("Connected to Redis at %s", settings.redis_location)
            return True
        if attempt < attempts:
            delay = settings.redis_connect_retry_delay
            log.info(
                "Connection attempt %d/%d failed. Retrying in %ss...",
                attempt, attempts, f"{delay:g}",
            )  # fmt: skip
            if stop is not None and stop.wait(delay):
                return False
            if stop is None:
                threading.Event().wait(delay)
    log.info("Failed to connect to Redis after %d attempts. Exiting.", attempts)
    return False
