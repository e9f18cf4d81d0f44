"""Clock skew: real worker processes whose clock is one hour ahead or behind (libfaketime,
Debian's ``faketime`` package) must not change when retries become due, because due
times are scored and compared on Redis's clock, not the worker's."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_lib

from consumers.config import DATABASE_VARS
from messaging import envelope, keys
from messaging.queue import RedisQueue
from tests.helpers import BIN, Proc, wait_for
from tests.integration.test_consumer_processes import order_placed
from tests.orders_app import PostgresCluster

LIBFAKETIME = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))


def skewed(offset: str) -> dict[str, str]:
    """Environment making a child process's wall clock ``offset`` (e.g. '+1h') off."""
    if not LIBFAKETIME:
        if os.environ.get("CI"):
            pytest.fail("libfaketime is required in CI (apt-get install faketime)")
        pytest.skip("no libfaketime (apt-get install faketime)")
    return {
        "LD_PRELOAD": LIBFAKETIME[0],
        "FAKETIME": offset,
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",  # timeouts and backoff waits stay real
    }


@pytest.fixture
def bredis(redis: redis_lib.Redis, redis_url: str) -> Iterator[redis_lib.Redis]:
    client = redis_lib.Redis.from_url(redis_url)
    yield client
    client.close()


def redis_now(client: redis_lib.Redis) -> float:
    seconds, micros = client.time()
    return float(seconds) + micros / 1e6


def start(tmp_path: Path, redis_url: str, name: str, **env: str) -> Proc:
    db = f"sqlite:///{tmp_path / 'consumers.db'}"
    return Proc(
        [str(BIN / "consumer"), name],
        {
            "REDIS_URL": redis_url,
            **{var: db for var in DATABASE_VARS.values()},
            "CONSUMER_HEARTBEAT_TTL": "2",
            **env,
        },
        tmp_path / f"{name}.log",
    )


def test_a_worker_an_hour_ahead_promotes_only_what_is_due_on_redis_clock(
    tmp_path: Path, redis_url: str, bredis: redis_lib.Redis
) -> None:
    now = redis_now(bredis)
    due = envelope.dumps(order_placed(1)).encode()
    later = envelope.dumps(order_placed(2)).encode()
    bredis.zadd(keys.delayed(keys.NOOP_QUEUE), {due: now - 1, later: now + 1800})
    proc = start(tmp_path, redis_url, "noop", **skewed("+1h"))
    try:
        queue = RedisQueue(bredis, keys.NOOP_QUEUE)
        wait_for(lambda: queue.stats()["processed"] == 1, 20, message="the due retry handled")
        # Four more promote rounds (every 0.5 s) of the skewed worker: the later one stays.
        rounds = redis_now(bredis) + 2.0
        wait_for(lambda: redis_now(bredis) > rounds, 10, message="four more rounds")
        assert bredis.zrange(keys.delayed(keys.NOOP_QUEUE), 0, -1) == [later]
        assert queue.stats()["processed"] == 1
    finally:
        proc.kill()


def test_a_worker_an_hour_behind_schedules_its_retry_on_redis_clock(
    tmp_path: Path, redis_url: str, bredis: redis_lib.Redis
) -> None:
    """flaky@example.com fails transiently first: the retry's due time is Redis's now
    plus the backoff, not the worker's now (an hour ago, due at once for everyone)."""
    queue = RedisQueue(bredis, "payment")
    queue.push(envelope.dumps(order_placed(3, "flaky@example.com")))
    proc = start(
        tmp_path,
        redis_url,
        "payment",
        CONSUMER_BACKOFF_BASE="600",
        CONSUMER_BACKOFF_MAX="600",
        **skewed("-1h"),
    )
    try:
        before = redis_now(bredis)
        wait_for(lambda: queue.stats()["delayed"] == 1, 20, message="a retry scheduled")
        [(_raw, score)] = bredis.zrange(keys.delayed("payment"), 0, -1, withscores=True)
        assert before - 1 <= score <= redis_now(bredis) + 600
    finally:
        proc.kill()


def test_a_relay_an_hour_ahead_does_not_steal_a_live_outbox_claim(
    tmp_path: Path, redis_url: str, bredis: redis_lib.Redis, postgres_cluster: PostgresCluster
) -> None:
    """The claim is written and compared on the database's clock: a relay whose host is
    an hour ahead publishes the unclaimed row and leaves the row another relay claimed
    for 30 minutes alone (with its own clock it saw that claim long expired).

    PostgreSQL: the server's clock is one for every host. (SQLite's ``'now'`` is the
    clock of the process running the statement; its file lives on one host, whose
    processes share one clock, which libfaketime would fake per process.)"""
    from sqlalchemy import insert, select, update

    from messaging import database
    from orders.bootstrap import create_schema
    from orders.models import Outbox, utc_now

    url = postgres_cluster.create_database()
    engine = database.database_engine(url)
    create_schema(engine)
    events = [order_placed(n) for n in (1, 2)]
    with engine.begin() as conn:
        for event in events:
            conn.execute(
                insert(Outbox).values(
                    event_id=event["id"], type=event["type"], payload=envelope.dumps(event),
                    created_at=utc_now(), attempts=0,
                )
            )  # fmt: skip
        conn.execute(
            update(Outbox)
            .where(Outbox.event_id == events[1]["id"])
            .values(claimed_until=database.now_plus("postgresql", 1800))
        )
    relay = Proc(
        [str(BIN / "orders-relay")],
        {"REDIS_URL": redis_url, "DATABASE_URL": url, "RELAY_INTERVAL": "0.1", **skewed("+1h")},
        tmp_path / "relay.log",
    )
    try:
        queue = RedisQueue(bredis, "payment")
        wait_for(lambda: queue.stats()["pending"] >= 1, 20, message="the free row published")
        rounds = redis_now(bredis) + 1.0  # ten more relay polls
        wait_for(lambda: redis_now(bredis) > rounds, 10, message="ten more polls")
        with engine.connect() as conn:
            published = conn.scalars(
                select(Outbox.event_id).where(Outbox.published_at.is_not(None))
            ).all()
        assert published == [events[0]["id"]]
        assert queue.stats()["pending"] == 1
    finally:
        relay.kill()
        engine.dispose()


PLACE_ONE_ORDER = """
import hashlib, sys
from decimal import Decimal
from messaging.database import database_engine
from orders.service import place_order
from orders.validation import LineRequest, OrderRequest

engine = database_engine(sys.argv[1])
request = OrderRequest("ada@example.com", "EUR", (LineRequest("BOOK", 1, Decimal("12.50")),))
result = place_order(engine, request, hashlib.sha256(b"x").hexdigest(), claim_seconds=15)
print(result.outbox_id)
"""


@pytest.mark.parametrize("offset", ["+1h", "-1h"])
def test_an_order_placed_on_a_skewed_host_is_born_claimed_on_the_database_clock(
    offset: str, postgres_cluster: PostgresCluster
) -> None:
    """POST writes its outbox row claimed for RELAY_CLAIM_SECONDS; the relays compare
    that claim with the database's clock, so it must be written with that clock too.
    With the API host's clock an hour ahead the claim lasted an hour (a failed fast path
    waited that long for the relay); an hour behind, it was expired at birth (every
    relay raced the fast path and published the event twice)."""
    import subprocess
    import sys

    from sqlalchemy import text

    from messaging import database
    from orders.bootstrap import create_schema

    url = postgres_cluster.create_database()
    engine = database.database_engine(url)
    create_schema(engine)
    try:
        done = subprocess.run(
            [sys.executable, "-c", PLACE_ONE_ORDER, url],
            env={**os.environ, **skewed(offset)},
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        outbox_id = int(done.stdout.strip().splitlines()[-1])
        with engine.connect() as conn:
            left = conn.execute(
                text(
                    "SELECT EXTRACT(EPOCH FROM claimed_until - clock_timestamp()) "
                    "FROM outbox WHERE id = :id"
                ),
                {"id": outbox_id},
            ).scalar_one()
        assert 0 < float(left) <= 15, f"claim left {left} s on the database clock"
    finally:
        engine.dispose()
