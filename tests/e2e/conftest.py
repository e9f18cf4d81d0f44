"""The real stack for end-to-end tests: Redis, orders-api (gunicorn), the four consumers
and smtp-sink, all real processes on one SQLite database.

``stack`` starts it (chaos/stack.py's :class:`chaos.stack.Stack`, one consumer per queue,
on a dedicated Redis server, so a test may kill and restart it) and stops it all
afterwards; the payment consumer serves its metrics on ``payment_metrics``.

``start_api`` starts only the order service's two servers, ``orders-api`` (gunicorn,
relay in process) and ``orders-stream``, on one SQLite file (:class:`Api`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis as redis_lib
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from chaos import stack as chaos_stack
from devtools.procs import http_ok
from devtools.redis_server import RedisServer, free_port
from orders.models import Order
from tests.helpers import BIN, Proc, wait_for

TOKEN = "operator-token-for-the-stream-test"
"""ADMIN_TOKEN of :class:`Api`."""


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


class Api:
    """orders-api (``port``) and orders-stream (``stream_port``), real processes, on one
    SQLite file and the session's Redis; per-IP rate limit off, operator token TOKEN."""

    def __init__(self, tmp_path: Path, redis_url: str, **env: str) -> None:
        self.port, self.stream_port = free_port(), free_port()
        self.db = tmp_path / "orders.db"
        self.redis_url = redis_url
        common = {
            "HOST": "127.0.0.1",
            "DATABASE_URL": f"sqlite:///{self.db}",
            "REDIS_URL": redis_url,
            "RATE_LIMIT_PER_MINUTE": "0",
            "STREAM_PORT": str(self.stream_port),
            "ADMIN_TOKEN": TOKEN,
        }
        self.api = Proc(
            [str(BIN / "orders-api")],
            {**common, "PORT": str(self.port), "RELAY_IN_PROCESS": "1", **env},
            tmp_path / "api.log",
        )
        self.stream = Proc([str(BIN / "orders-stream")], common, tmp_path / "stream.log")
        wait_for(lambda: http_ok(f"http://127.0.0.1:{self.port}/healthz"), 30, 0.05, "orders-api")
        wait_for(
            lambda: http_ok(f"http://127.0.0.1:{self.stream_port}/healthz"), 30, 0.05, "stream"
        )

    def orders(self) -> int:
        engine = create_engine(f"sqlite:///{self.db}")
        try:
            with Session(engine) as session:
                return int(session.scalar(select(func.count()).select_from(Order)) or 0)
        finally:
            engine.dispose()

    def stop(self) -> None:
        for proc in (self.api, self.stream):
            if proc.alive():
                proc.terminate(20.0)


@pytest.fixture
def start_api(tmp_path: Path, redis_url: str, redis: redis_lib.Redis) -> Iterator[type]:
    """``start_api(**env)`` starts an :class:`Api` (env over its defaults); all stop after."""
    started: list[Api] = []

    def start(**env: str) -> Api:
        api = Api(tmp_path, redis_url, **env)
        started.append(api)
        return api

    yield start  # type: ignore[misc]
    for api in started:
        api.stop()
