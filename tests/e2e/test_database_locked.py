"""A locked SQLite answers 503 through the real orders-api, never a 500, and loses nothing.

``orders-api`` (gunicorn) runs on a SQLite file while the test holds that file's write
lock from another connection (``BEGIN EXCLUSIVE``) for longer than the API's busy
timeout. ``POST /orders`` must then answer 503 problem+json with ``Retry-After`` (a
passing condition the client retries), reads keep working (WAL), and once the lock is
gone the same request with the same Idempotency-Key creates exactly one order.
"""

from __future__ import annotations

import json
import sqlite3
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_lib

from chaos.stack import order_body, post_order
from devtools.procs import http_ok
from devtools.redis_server import free_port
from tests.helpers import BIN, Proc, wait_for
from tests.orders_app import ADMIN, ADMIN_TOKEN

pytestmark = pytest.mark.e2e


@pytest.fixture
def api(tmp_path: Path, redis: redis_lib.Redis, redis_url: str) -> Iterator[tuple[str, Path]]:
    db = tmp_path / "orders.db"
    port = free_port()
    proc = Proc(
        [str(BIN / "orders-api")],
        {
            "REDIS_URL": redis_url,
            "DATABASE_URL": f"sqlite:///{db}",
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "WEB_CONCURRENCY": "1",
            "RELAY_IN_PROCESS": "0",
            "ADMIN_TOKEN": ADMIN_TOKEN,
        },
        tmp_path / "api.log",
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http_ok(base + "/healthz") or not proc.alive(), 60, 0.1, "orders-api")
        proc.check_alive()
        yield base, db
    finally:
        proc.terminate()


def test_a_locked_sqlite_answers_503_never_500_and_the_retry_places_one_order(
    api: tuple[str, Path],
) -> None:
    base, db = api
    first = post_order(base + "/orders", order_body(2), "before-lock")
    lock = sqlite3.connect(db, timeout=30, isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        with pytest.raises(urllib.error.HTTPError) as answer:
            post_order(base + "/orders", order_body(3), "during-lock", timeout=60)
        assert answer.value.code == 503, answer.value.read()
        assert answer.value.headers["Content-Type"] == "application/problem+json"
        assert answer.value.headers["Retry-After"] == "1"
        problem = json.loads(answer.value.read())
        assert problem["status"] == 503 and problem["title"] == "Database unavailable"
        # WAL: the lock blocks writers only; reading the order placed before still works.
        with urllib.request.urlopen(f"{base}/orders/{first}", timeout=30) as response:
            assert json.loads(response.read())["id"] == first
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    second = post_order(base + "/orders", order_body(3), "during-lock")
    assert post_order(base + "/orders", order_body(3), "during-lock") == second
    listing = urllib.request.Request(f"{base}/orders?limit=10", headers=ADMIN)
    with urllib.request.urlopen(listing, timeout=30) as response:
        assert [o["id"] for o in json.loads(response.read())["items"]] == [second, first]
