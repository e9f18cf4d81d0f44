"""The API under pressure: rate limit (429), a database that is down (503), reconciliation.

Real Redis and real SQLite/PostgreSQL through the Flask app.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis as redis_lib
from flask import Flask

from devtools.redis_server import RedisServer, free_port
from messaging import envelope, keys
from orders.api import RATE_LIMITER
from orders.app import create_app
from orders.bootstrap import GUARD_TIMEOUT_SECONDS
from orders.history import record_event
from orders.reconcile import reconcile
from tests.orders_app import ADMIN, ADMIN_TOKEN, ORDER, order, outcome, wait_published

NO_REDIS = "redis://127.0.0.1:1/0"


def test_a_client_over_its_limit_gets_429_with_retry_after(
    make_app: Callable[..., Flask], redis_url: str, redis: redis_lib.Redis
) -> None:
    client = make_app(redis_url, RATE_LIMIT_PER_MINUTE="3").test_client()
    for _ in range(3):
        assert client.get("/orders", headers=ADMIN).status_code == 200
    response = client.post("/orders", json=ORDER)
    assert response.status_code == 429
    assert response.headers["Content-Type"] == "application/problem+json"
    assert int(response.headers["Retry-After"]) >= 1  # 1 token per 20 s
    body = response.get_json()
    assert body["status"] == 429 and body["type"].endswith("/rate-limited")
    assert client.get("/healthz").status_code == 200, "probes are never limited"
    other = client.get("/orders", headers=ADMIN, environ_base={"REMOTE_ADDR": "192.0.2.7"})
    assert other.status_code == 200, "each client IP has its own bucket"
    assert redis.exists(keys.rate_limit("127.0.0.1"))
    assert 0 < redis.pttl(keys.rate_limit("127.0.0.1")) <= 61_000, "idle buckets expire"


def test_rate_limit_zero_is_off(
    make_app: Callable[..., Flask], redis_url: str, redis: redis_lib.Redis
) -> None:
    client = make_app(redis_url, RATE_LIMIT_PER_MINUTE="0").test_client()
    for _ in range(20):
        assert client.get("/orders", headers=ADMIN).status_code == 200
    assert not redis.exists(keys.rate_limit("127.0.0.1"))


def test_the_limiter_fails_open_when_redis_is_down(make_app: Callable[..., Flask]) -> None:
    client = make_app(NO_REDIS, RATE_LIMIT_PER_MINUTE="1").test_client()
    for n in range(3):  # over the limit, but nobody can count: orders are still taken
        response = client.post("/orders", json=order(customer_email=f"c{n}@example.com"))
        assert response.status_code == 201, response.get_json()


@contextmanager
def frozen(server: RedisServer) -> Iterator[None]:
    """SIGSTOP the server: connections stay open, nothing answers (a hang, not a refusal)."""
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


def test_a_frozen_redis_costs_a_request_the_guard_timeout_once_then_nothing(
    make_app: Callable[..., Flask],
    redis_server_factory: Callable[..., RedisServer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The rate limit and /readyz use the request path's own client (``guard``): it gives
    up after GUARD_TIMEOUT_SECONDS, with no retry, so a Redis that hangs delays a request
    by that, not by the other clients' 5 s twice (a POST took 10 s, /readyz 15 s); while
    it stays down one request at a time probes it and the others pass at once."""
    server = redis_server_factory()
    app = make_app(server.url, RATE_LIMIT_PER_MINUTE="1000")
    client = app.test_client()
    assert client.post("/orders", json=ORDER).status_code == 201  # connected, counted
    guard = app.extensions["orders"].guard
    assert guard.connection_pool.connection_kwargs["socket_timeout"] == GUARD_TIMEOUT_SECONDS
    limiter = app.extensions[RATE_LIMITER]
    calls: list[str] = []
    probing = threading.Event()
    real_script = limiter._script

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(threading.current_thread().name)
        probing.set()
        return real_script(*args, **kwargs)

    limiter._script = counted
    with frozen(server), caplog.at_level(logging.WARNING, "orders-api"):
        response = client.post("/orders", json=order(customer_email="b@example.com"))
        assert response.status_code == 201, response.get_json()
        assert calls == ["MainThread"]
        assert "Rate limiter unavailable, allowing requests: Timeout" in caplog.text
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.get_json()["checks"] == {"database": "ok", "redis": "down"}
        # Past the fail-open pause: one request probes (and waits), the others pass.
        limiter._skip_until = 0.0
        probing.clear()
        prober = threading.Thread(target=limiter.check, args=("192.0.2.1",), name="prober")
        prober.start()
        assert probing.wait(10)
        assert limiter.check("192.0.2.2").allowed
        assert client.post("/orders", json=order(customer_email="c@example.com")).status_code == 201
        prober.join(10)
        assert calls == ["MainThread", "prober"]
    # Redis is back: the next probe finds it, and the limit counts again.
    limiter._skip_until = 0.0
    assert limiter.check("127.0.0.1").remaining >= 0
    assert "Rate limiter available again" in caplog.text
    assert limiter.check("127.0.0.1").remaining >= 0
    assert calls[-2:] == ["MainThread", "MainThread"]


def test_an_unreachable_database_is_503_problem_json(redis_url: str) -> None:
    down = f"postgresql+psycopg://orders:pw@127.0.0.1:{free_port()}/orders"
    flask_app = create_app(
        {"DATABASE_URL": down, "REDIS_URL": redis_url, "ADMIN_TOKEN": ADMIN_TOKEN, "TESTING": True}
    )
    client = flask_app.test_client()
    for response in (client.get("/orders", headers=ADMIN), client.post("/orders", json=ORDER)):
        assert response.status_code == 503, response.get_data(as_text=True)
        assert response.headers["Content-Type"] == "application/problem+json"
        assert response.headers["Retry-After"] == "1"
        assert response.get_json()["type"].endswith("/database-unavailable")
    flask_app.extensions["orders"].close()


@pytest.mark.usefixtures("redis")
def test_reconcile_republishes_the_stored_event_of_incomplete_orders_only(
    make_app: Callable[..., Flask], redis_url: str, redis: redis_lib.Redis
) -> None:
    app = make_app(redis_url, RATE_LIMIT_PER_MINUTE="0")
    client = app.test_client()
    done = client.post("/orders", json=order(customer_email="done@example.com")).get_json()["id"]
    lost = client.post("/orders", json=order(customer_email="lost@example.com")).get_json()["id"]
    wait_published(app)
    first_publish = [json.loads(m) for m in redis.lrange(keys.pending("payment"), 0, -1)]
    assert [e["data"]["order_id"] for e in first_publish] == [done, lost]
    svc = app.extensions["orders"]
    with svc.sessions.begin() as session:
        for event_type in (
            envelope.PAYMENT_CAPTURED,
            envelope.INVOICE_ISSUED,
            envelope.SHIPMENT_BOOKED,
        ):
            record_event(session, outcome(event_type, done))
        for step in ("received", "shipped"):
            record_event(session, outcome(envelope.CUSTOMER_NOTIFIED, done, step=step))
        # Cancelled, but its "payment declined" email never got recorded: not settled.
        record_event(session, outcome(envelope.PAYMENT_DECLINED, lost))
        record_event(session, outcome(envelope.CUSTOMER_NOTIFIED, lost, step="received"))
    redis.flushdb()  # Redis lost the jobs (say, the AOF tail of a power cut)

    result = reconcile(svc.engine, svc.publisher, older_than=0, window=3600)

    assert result.incomplete == [lost] and result.republished == 1
    for queue in envelope.queues_for(envelope.ORDER_PLACED):
        again = [json.loads(m) for m in redis.lrange(keys.pending(queue), 0, -1)]
        assert again == [first_publish[1]], "the stored event, same id, to its queues"
    assert reconcile(svc.engine, svc.publisher, older_than=3600, window=7200).checked == 0
