"""Helpers for the order service's tests: a sample order, app builder, a real PostgreSQL.

PostgreSQL: :class:`PostgresCluster` runs ``initdb`` and ``postgres`` from the machine's
PostgreSQL binaries in a temporary directory on a free port (as the ``nobody`` user
when the tests run as root, since postgres refuses to run as root).
"""

from __future__ import annotations

import copy
import glob
import os
import shutil
import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flask import Flask

from devtools.redis_server import free_port
from messaging import envelope
from orders.app import create_app
from orders.bootstrap import create_schema

ORDER: dict[str, Any] = {
    "customer_email": "ada@example.com",
    "currency": "EUR",
    "items": [{"sku": "BOOK-1", "quantity": 2, "unit_price": "12.50"}],
}
"""The golden order: 2 x 12.50 EUR = 25.00."""


ADMIN_TOKEN = "test-operator-token-0123456789"
"""The operator credential of every app :func:`build_app` makes (ADMIN_TOKEN)."""
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
"""Headers that authenticate a test request as the operator."""


def outcome(
    event_type: str, order_id: int, timestamp: str | None = None, **data: Any
) -> dict[str, Any]:
    """An outcome event of order ``order_id`` as another service emits it (``timestamp``:
    when it happened, UTC RFC 3339; now by default)."""
    return envelope.envelope(
        event_type,
        {"order_id": order_id, **data},
        message=f"{event_type} for order {order_id}",
        sender="test",
        count=order_id,
        timestamp=timestamp or datetime.now(UTC).isoformat(),
    )


def order_placed(
    order_id: int = 1,
    *,
    express: bool = False,
    event_id: str | None = None,
    timestamp: str | None = None,
) -> dict[str, Any]:
    """An OrderPlaced event of a one-line order as orders-api emits it (express or not);
    the same ``event_id`` and ``timestamp`` give the same bytes every time."""
    return envelope.envelope(
        envelope.ORDER_PLACED,
        {
            "order_id": order_id,
            "customer_email": "ann@example.com",
            "currency": "EUR",
            "lines": [{"sku": "A", "quantity": 1, "unit_price": "1.00", "line_total": "1.00"}],
            "total": "1.00",
            **({"priority": "express"} if express else {}),
        },
        message=f"Order #{order_id} placed",
        sender="orders-api",
        count=order_id,
        event_id=event_id,
        timestamp=timestamp,
        priority="express" if express else "standard",
    )


def order(**changes: Any) -> dict[str, Any]:
    """A copy of :data:`ORDER` with top-level fields replaced."""
    body = copy.deepcopy(ORDER)
    body.update(changes)
    return body


def build_app(database_url: str, redis_url: str, pattern: str = "both", **env: str) -> Flask:
    """An app on this database and Redis, its tables created."""
    app = create_app(
        {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "PATTERN": pattern,
            "RELAY_IN_PROCESS": "0",
            "ADMIN_TOKEN": ADMIN_TOKEN,
            "TESTING": True,
            **env,
        }
    )
    create_schema(app.extensions["orders"].engine)
    return app


def wait_published(app: Flask, timeout: float = 30.0) -> None:
    """Wait until the app's background publisher has sent every accepted order's event.

    POST /orders answers before its OrderPlaced is in Redis (orders.outbox.FastPublisher);
    a test that then inspects or empties Redis waits for this first.
    """
    from orders.api import PUBLISHER
    from tests.helpers import wait_for

    publisher = app.extensions.get(PUBLISHER)
    if publisher is not None:
        wait_for(lambda: publisher.pending() == 0, timeout, message="events published")


def find_postgres_bin() -> Path | None:
    """The directory holding initdb and pg_ctl, or None."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).parent
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    return None


class PostgresCluster:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (trust auth, fsync off)."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="orders-pg-"))
        self.data = self.root / "data"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.root, "nobody")
            self._as_user = ["runuser", "-u", "nobody", "--"]
        self._databases = 0

    def _run(self, *argv: str) -> None:
        subprocess.run(
            [*self._as_user, *argv], check=True, capture_output=True, cwd=self.root, timeout=60
        )

    def start(self) -> PostgresCluster:
        """initdb and start; raises CalledProcessError with the tool's output on failure."""
        self._run(
            str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", "postgres",
            "-A", "trust", "-E", "UTF8", "--no-sync",
        )  # fmt: skip
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=200"
        )
        self._run(
            str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"),
            "-o", options, "-w", "start",
        )  # fmt: skip
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        import psycopg

        self._databases += 1
        name = f"orders_{self._databases}"
        with psycopg.connect(
            f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)
