"""The real stack for end-to-end tests: Redis, orders-api (gunicorn), the four consumers
and smtp-sink, all real processes on one SQLite database.

``stack`` starts it (chaos/stack.py's :class:`chaos.stack.Stack`, one consumer per queue,
on a dedicated Redis server, so a test may kill and restart it) and stops it all
afterwards; the payment consumer serves its metrics on ``payment_metrics``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chaos import stack as chaos_stack
from devtools.redis_server import RedisServer, free_port


class Stack(chaos_stack.Stack):
    """The chaos stack as the end-to-end tests run it: no fault tuning, INFO logs."""

    def __init__(self, root: Path, redis: RedisServer) -> None:
        metrics_port = free_port()
        self.payment_metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        super().__init__(
            root,
            redis=redis,
            workers_per_queue=1,
            proxy=False,
            common_env={"REDIS_CONNECT_ATTEMPTS": "100", "LOG_LEVEL": "INFO"},
            api_env={},
            tuning={"CONSUMER_HEARTBEAT_TTL": "3"},
            slot_env={"payment": {"METRICS_PORT": str(metrics_port)}},
        )


@pytest.fixture
def stack(tmp_path: Path, redis_server_factory: Callable[..., RedisServer]) -> Iterator[Stack]:
    running = Stack(tmp_path / "stack", redis_server_factory())
    try:
        running.start()
        yield running
    finally:
        running.stop()
