"""The Redis topologies the integration and e2e tests run on: one node, or a cluster.

A :class:`Topology` names where Redis is and builds clients the way the product does
(through :func:`orders.bootstrap.redis_client`, so a cluster client is the product's
own ``RedisCluster``). Tests that take the ``topology`` fixture run once per topology:
``single`` (the session's redis-server) and ``cluster`` (the session's 3 masters + 3
replicas Redis Cluster).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis

from messaging.config import Settings
from messaging.connection import redis_client


@dataclass(frozen=True)
class Topology:
    """Where Redis is, and whether it is a cluster."""

    name: str
    redis_url: str
    cluster: bool

    @property
    def env(self) -> dict[str, str]:
        """The environment variables that point a process at this Redis."""
        return {"REDIS_URL": self.redis_url, "REDIS_CLUSTER": "1" if self.cluster else "0"}

    @property
    def host_port(self) -> tuple[str, int]:
        """The (seed) node's host and port, for REDIS_HOST/REDIS_PORT users (Go)."""
        parts = urlsplit(self.redis_url)
        return str(parts.hostname), int(parts.port or 6379)

    def client(self, **overrides: Any) -> redis.Redis:
        """A client built by the product's bootstrap (decoded strings unless overridden)."""
        return redis_client(Settings.from_env(self.env), **overrides)

    def flush(self) -> None:
        """Empty every database this topology has (every master of a cluster)."""
        client = self.client()
        try:
            client.flushall()
        finally:
            client.close()
