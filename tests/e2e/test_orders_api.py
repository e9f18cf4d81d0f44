"""The real orders-api console script: gunicorn workers, SQLite, a real Redis."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib

from devtools.redis_server import free_port
from messaging import envelope, keys
from tests.helpers import BIN, Proc, wait_for
from tests.orders_app import ORDER

pytestmark = pytest.mark.e2e


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except (urllib.error.URLError, ConnectionError):
        return 0


def _post(url: str, body: dict[str, Any], key: str) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Idempotency-Key": key},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(response.status), json.loads(response.read())


def test_orders_api_places_an_order_and_the_relay_feeds_the_queues(
    redis: redis_lib.Redis, redis_url: str, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "WEB_CONCURRENCY": "2",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'var' / 'orders.db'}",
        "REDIS_URL": redis_url,
        "PATTERN": "both",
        "RELAY_IN_PROCESS": "1",
        "RELAY_INTERVAL": "0.1",
    }
    api = Proc([str(BIN / "orders-api")], env, tmp_path / "api.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _get(base + "/healthz") == 200 or api.popen.poll() is not None, 20)
        assert api.popen.poll() is None, api.output()
        assert _get(base + "/readyz") == 200
        status, created = _post(base + "/orders", ORDER, "e2e-1")
        assert status == 201 and created["total"] == "25.00"
        again, same = _post(base + "/orders", ORDER, "e2e-1")
        assert (again, same["id"]) == (200, created["id"])
        queues = [keys.pending(q) for q in envelope.queues_for(envelope.ORDER_PLACED)]
        wait_for(lambda: all(redis.llen(k) == 1 for k in queues), message="one job per queue")
        for key in queues:
            job = json.loads(redis.lindex(key, 0))
            assert (job["type"], job["data"]["order_id"]) == ("OrderPlaced", created["id"])
    finally:
        code = api.terminate()
    assert code == 0, api.output()
    assert "Traceback" not in api.output()


def _placed_total(base: str, token: str) -> float:
    """``orders_placed_total`` of /metrics, summed over every worker's samples."""
    request = urllib.request.Request(
        f"{base}/metrics", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        text = response.read().decode()
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("orders_placed_total")
    )


def _workers(master: int) -> set[int]:
    found = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True)
    return {int(pid) for pid in found.stdout.split()}


def test_a_worker_that_exits_leaves_the_others_metrics_and_a_new_worker_boots(
    redis_url: str, tmp_path: Path
) -> None:
    """A gunicorn worker is a fork of orders-api's main(): its exit unwound through the
    master's cleanup and deleted the metrics directory of the live workers (their counts
    gone from /metrics; a worker booting meanwhile failed, and the server exited 3)."""
    port, token = free_port(), "t" * 32
    env = {
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "WEB_CONCURRENCY": "2",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'orders.db'}",
        "REDIS_URL": redis_url,
        "ADMIN_TOKEN": token,
        "RATE_LIMIT_PER_MINUTE": "0",
    }
    api = Proc([str(BIN / "orders-api")], env, tmp_path / "api.log")
    base = f"http://127.0.0.1:{port}"
    try:
        first = wait_for(lambda: len(w := _workers(api.popen.pid)) == 2 and w, 30, 0.1, "2 workers")
        wait_for(lambda: _get(base + "/healthz") == 200, 30, 0.1, "orders-api answers")
        for n in range(4):
            assert _post(base + "/orders", ORDER, f"worker-exit-{n}")[0] == 201
        assert _placed_total(base, token) == 4
        victim = min(first)
        subprocess.run(["kill", "-TERM", str(victim)], check=True)  # gunicorn starts another
        wait_for(
            lambda: len(w := _workers(api.popen.pid)) == 2 and victim not in w,
            30,
            0.1,
            "a new worker in place of the one that exited",
        )
        wait_for(lambda: _get(base + "/healthz") == 200, 30, 0.1, "orders-api answers")
        api.check_alive()
        assert _placed_total(base, token) == 4  # counters of every worker, the dead one's too
    finally:
        code = api.terminate()
    assert code == 0, api.output()


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"DATABASE_URL": "mysql://db/orders"}, "orders-api: invalid DATABASE_URL 'mysql://"),
        ({"PORT": "eighty"}, "orders-api: invalid PORT 'eighty': must be an integer"),
        ({"WEB_CONCURRENCY": "0"}, "orders-api: invalid WEB_CONCURRENCY '0'"),
    ],
)
def test_bad_configuration_is_one_line_and_exit_2(env: dict[str, str], needle: str) -> None:
    result = subprocess.run(
        [str(BIN / "orders-api")], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(needle)
    assert result.stderr.count("\n") == 1
