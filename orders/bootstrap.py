"""The one place that builds the order service's object graph from its settings.

Nothing connects at import time: entry points call these functions after reading
their :class:`~orders.config.OrderServiceSettings`.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from messaging.connection import redis_client
from messaging.database import create_tables, database_engine
from messaging.publisher import EventPublisher
from orders.config import OrderServiceSettings


def create_schema(engine: Engine) -> None:
    """Create the order service's tables if missing (idempotent, safe to run concurrently)."""
    from orders.models import Base

    create_tables(engine, Base.metadata)
    _add_priority_column(engine)


def _add_priority_column(engine: Engine) -> None:
    """Add ``orders.priority`` to a database created before orders had one (additive only).

    Concurrent starters may both try: the loser's "duplicate column" error is ignored.
    """
    from sqlalchemy import inspect, text
    from sqlalchemy.exc import DBAPIError

    if "priority" in {c["name"] for c in inspect(engine).get_columns("orders")}:
        return
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "ALTER TABLE orders ADD COLUMN priority VARCHAR(16) NOT NULL DEFAULT 'standard'"
                )
            )
    except DBAPIError as exc:
        if "duplicate" not in str(exc).lower() and "already exists" not in str(exc).lower():
            raise


@dataclass
class OrderServices:
    """The object graph of orders-api and orders-relay, built once per process."""

    settings: OrderServiceSettings
    engine: Engine
    sessions: sessionmaker[Session]
    redis: Redis
    publisher: EventPublisher
    monitor: Redis
    """Bytes (not decoded) client of the dashboard and /metrics: dead letters may be garbage."""
    guard: Redis
    """The request path's client (rate limit, token throttle, /readyz): it gives up after
    :data:`GUARD_TIMEOUT_SECONDS`, once, so a Redis that hangs (stopped, cut off by a
    network that drops instead of refusing) delays a request by that much, not by the
    other clients' timeouts; the limits fail open."""

    def close(self) -> None:
        """Release pooled connections (database and Redis)."""
        self.engine.dispose()
        self.redis.close()
        self.monitor.close()
        self.guard.close()


GUARD_TIMEOUT_SECONDS = 0.5
"""How long a request waits for Redis on its own path (a rate-limit check takes well
under a millisecond): then the limit fails open and /readyz reports Redis down."""
MONITOR_TIMEOUT_SECONDS = 2.0
"""The dashboard's and /metrics' Redis reads: a page polls them every few seconds, and
a frozen Redis must not hold a request thread for long on each poll."""


def order_services(settings: OrderServiceSettings) -> OrderServices:
    """Build the engine, session factory, Redis client and publisher; connect to nothing.

    The Redis client fails fast (short timeouts, one retry): a POST must not hang while
    Redis is down, since the outbox relay delivers the event later anyway.
    """
    engine = database_engine(settings.database_url)
    client = redis_client(
        settings.base,
        socket_connect_timeout=2,
        socket_timeout=5,
        retry=Retry(NoBackoff(), 1),
    )
    return OrderServices(
        settings=settings,
        engine=engine,
        sessions=sessionmaker(engine, expire_on_commit=False),
        redis=client,
        # feed=True: OrderPlaced reaches the live feed with PATTERN=queue too.
        publisher=EventPublisher(
            client,
            settings.base.pattern,
            wait_replicas=settings.base.redis_wait_replicas,
            feed=True,
        ),
        monitor=redis_client(
            settings.base,
            decode_responses=False,
            socket_connect_timeout=MONITOR_TIMEOUT_SECONDS,
            socket_timeout=MONITOR_TIMEOUT_SECONDS,
            retry=Retry(NoBackoff(), 0),
        ),
        guard=redis_client(
            settings.base,
            socket_connect_timeout=GUARD_TIMEOUT_SECONDS,
            socket_timeout=GUARD_TIMEOUT_SECONDS,
            retry=Retry(NoBackoff(), 0),
        ),
    )
