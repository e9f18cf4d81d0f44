"""The Redis connection every process shares: TLS, Redis Cluster, retries at start.

Nothing connects at import time: entry points call these functions after reading
their :class:`~messaging.config.Settings`. No SQLAlchemy here: the Hello publisher
imports this module and must stay light.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException

from messaging.config import Settings

log = logging.getLogger(__name__)


def redis_client(settings: Settings, **overrides: object) -> redis.Redis:
    """A Redis client for the configured server (REDIS_URL wins over host/port).

    With REDIS_CLUSTER=1 it is a :class:`redis.cluster.RedisCluster` seeded by that one
    node (it discovers the others): the same command API, per-key routing, ``pubsub()``
    for classic pub/sub (PUBLISH reaches every node), and ``pipeline()`` grouping
    commands by node. Multi-key commands and scripts must stay in one slot (the queue
    keys' hash tags do). Typed as ``redis.Redis`` for callers; it duck-types it.
    """
    options: dict[str, object] = {
        "decode_responses": True,
        "socket_connect_timeout": 5,
        "socket_timeout": 5,
        "health_check_interval": 30,
    }
    if settings.redis_url.startswith("rediss://"):
        # TLS always verifies the server: its certificate chain (against REDIS_TLS_CA_FILE,
        # or the system's CAs when empty) and that it names the URL's host.
        options.update(ssl_cert_reqs="required", ssl_check_hostname=True)
        if settings.redis_tls_ca_file:
            options["ssl_ca_certs"] = settings.redis_tls_ca_file
    options.update(overrides)
    if settings.redis_cluster:
        if settings.redis_url:
            options["url"] = settings.redis_url
        else:
            options.update(host=settings.redis_host, port=settings.redis_port)
        return LazyRedisCluster(**options)  # type: ignore[return-value]
    if settings.redis_url:
        return redis.Redis.from_url(settings.redis_url, **options)  # type: ignore[arg-type,call-overload]
    return redis.Redis(host=settings.redis_host, port=settings.redis_port, **options)  # type: ignore[arg-type,call-overload]


class LazyRedisCluster(RedisCluster):
    """A RedisCluster that connects on first use, as ``redis.Redis`` does.

    redis-py's RedisCluster discovers the cluster in its constructor and raises when no
    seed node answers; our processes build clients before Redis may be up, then retry
    (REDIS_CONNECT_ATTEMPTS). Here the real constructor runs on the first attribute it
    sets being read, and "no node reachable" becomes a ``redis.ConnectionError``.
    """

    def __init__(self, **options: Any) -> None:  # noqa: D107 - deferred, see class doc
        self._lazy_options = options
        self._lazy_lock = threading.Lock()
        self._lazy_initializing = 0  # the thread running the real init, if any

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes that do not exist yet, i.e. before the real init.
        if name.startswith("_lazy") or self._lazy_initializing == threading.get_ident():
            raise AttributeError(name)  # the init itself probing its attributes
        with self._lazy_lock:  # other threads wait for the one initializing
            if "nodes_manager" not in self.__dict__:
                self._lazy_initializing = threading.get_ident()
                try:
                    RedisCluster.__init__(self, **self._lazy_options)
                except RedisClusterException as exc:
                    raise redis.ConnectionError(str(exc)) from exc
                finally:
                    self._lazy_initializing = 0
        return object.__getattribute__(self, name)

    def close(self) -> None:
        """Close the node connections (nothing to do if it never connected)."""
        if "nodes_manager" in self.__dict__:
            super().close()


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
