"""The real stack for end-to-end tests: Redis, orders-api (gunicorn), the four consumers
and smtp-sink, all real processes on one SQLite database.

``stack`` starts it (a dedicated Redis server, so a test may kill and restart it) and
stops it all afterwards; the payment consumer serves its metrics on ``payment_metrics``.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from devtools.redis_server import RedisServer, free_port
from tests.helpers import BIN, Proc, wait_for

CONSUMERS = ("payment", "invoice", "email", "updates")


def healthy(url: str) -> bool:
    """True when GET url answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@dataclass
class Stack:
    """The running processes and where to reach them."""

    redis: RedisServer
    base_url: str
    database_url: str
    payment_metrics: str
    api: Proc
    sink: Proc
    consumers: dict[str, Proc] = field(default_factory=dict)

    def logs(self) -> str:
        """Every process's output, for failure messages."""
        procs = {"api": self.api, "sink": self.sink, **self.consumers}
        return "\n".join(f"--- {name}\n{proc.output()[-3000:]}" for name, proc in procs.items())


@pytest.fixture
def stack(tmp_path: Path, redis_server_factory: Callable[..., RedisServer]) -> Iterator[Stack]:
    server = redis_server_factory()
    smtp_port, api_port, metrics_port = free_port(), free_port(), free_port()
    common = {
        "REDIS_URL": server.url,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'stack.db'}",
        "PATTERN": "both",
        "REDIS_CONNECT_ATTEMPTS": "100",
        "REDIS_CONNECT_RETRY_DELAY": "0.2",
        "LOG_LEVEL": "INFO",
    }
    sink = Proc(
        [str(BIN / "smtp-sink")],
        {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(smtp_port), "SMTP_SINK_DIR": str(tmp_path)},
        tmp_path / "sink.log",
    )
    api = Proc(
        [str(BIN / "orders-api")],
        {
            **common,
            "HOST": "127.0.0.1",
            "PORT": str(api_port),
            "WEB_CONCURRENCY": "2",
            "RELAY_IN_PROCESS": "1",
            "RELAY_INTERVAL": "0.2",
        },
        tmp_path / "api.log",
    )
    stack = Stack(
        redis=server,
        base_url=f"http://127.0.0.1:{api_port}",
        database_url=common["DATABASE_URL"],
        payment_metrics=f"http://127.0.0.1:{metrics_port}/metrics",
        api=api,
        sink=sink,
    )
    consumer_env = {
        **common,
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(smtp_port),
        "CONSUMER_HEARTBEAT_TTL": "3",
        "CONSUMER_BACKOFF_BASE": "0.1",
        "CONSUMER_BACKOFF_MAX": "1.0",
    }
    try:
        wait_for(lambda: healthy(stack.base_url + "/healthz"), 30, message="orders-api up")
        sink.wait_output("listening on")
        for name in CONSUMERS:
            env = {**consumer_env, "METRICS_PORT": str(metrics_port)} if name == "payment" else {}
            stack.consumers[name] = Proc(
                [str(BIN / "consumer"), name], env or consumer_env, tmp_path / f"{name}.log"
            )
        for proc in stack.consumers.values():
            proc.wait_output("started", timeout=30)
        yield stack
    finally:
        for proc in stack.consumers.values():
            proc.terminate(timeout=20)
        api.terminate(timeout=20)
        sink.terminate()
