"""3. Order intake: POST /orders per second through the production server, with vegeta.

``orders-api`` runs as in production: gunicorn, WEB_CONCURRENCY=2 workers x WEB_THREADS=4
(gthread), the outbox relay thread in each worker, PATTERN=both; on SQLite in WAL mode
and, where PostgreSQL binaries exist, on a throwaway PostgreSQL cluster (fsync off).
Each POST validates, writes order + lines + outbox row in one transaction and answers
201; the worker's background publisher sends OrderPlaced (Lua: channel + its queues) in
pipelined batches and marks the rows.

Limit, same run: :mod:`benchmarks.bare_app`, a bare Flask endpoint under the same
gunicorn configuration (same workers, threads, worker class), so the ratio is the share
of the web stack's capacity our order path keeps. vegeta runs on the same 2 cores as the
servers and takes a share of them; both sides pay it alike. Every request carries a new
``Idempotency-Key`` (each is a new order, and the key's unique index is part of the cost).

After the load, every stored order must be in each consumer queue (nothing lost).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import redis
from sqlalchemy import func, select

from benchmarks import vegeta
from benchmarks.harness import BIN, Context, Row, wait_http_ok
from devtools.procs import Proc, wait_until
from devtools.redis_server import free_port
from messaging import envelope, keys
from messaging.database import database_engine
from orders.models import Order

SECTION = "3"
WORKERS = 2
THREADS = 4
ORDER = {
    "customer_email": "ada@example.com",
    "currency": "EUR",
    "items": [
        {"sku": "BOOK-1", "quantity": 2, "unit_price": "12.50"},
        {"sku": "PEN-7", "quantity": 1, "unit_price": "3.20"},
    ],
}
"""The body vegeta sends (the same each time; a new Idempotency-Key each: a new order)."""


def server_env(port: int, database_url: str, redis_url: str) -> dict[str, str]:
    """orders-api's environment: production defaults, quiet logs, no rate limit."""
    return {
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "WEB_CONCURRENCY": str(WORKERS),
        "WEB_THREADS": str(THREADS),
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "PATTERN": "both",
        "RELAY_IN_PROCESS": "1",
        "LOG_LEVEL": "WARNING",
        # All load comes from one address (127.0.0.1): the per-IP limiter would turn
        # it into 429s. The bench measures capacity, so it is off.
        "RATE_LIMIT_PER_MINUTE": "0",
    }


def start_api(
    ctx: Context,
    database_url: str,
    argv: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> tuple[Proc, str]:
    """Start orders-api (or ``argv`` with its environment, ``env`` over it); returns it
    and its base URL."""
    port = free_port()
    logs = ctx.scratch("api")
    proc = Proc(
        argv or [str(BIN / "orders-api")],
        {**server_env(port, database_url, ctx.redis_url), **(env or {})},
        logs / "server.log",
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(f"{base}/healthz", proc)
    except Exception:
        proc.terminate(15.0)
        raise
    return proc, base


def body_file(ctx: Context) -> Path:
    """The order body as a file for vegeta."""
    path = ctx.scratch("body") / "order.json"
    path.write_text(json.dumps(ORDER))
    return path


def measure(ctx: Context, base: str, body: Path) -> list[vegeta.Load]:
    """A warm-up, then ``http_repeats`` timed runs of ``http_seconds`` each."""
    mode = ctx.mode
    url = f"{base}/orders"
    vegeta.post(url, body, requests=100, clients=4)
    return [
        vegeta.post(url, body, seconds=mode.http_seconds, clients=mode.http_clients)
        for _ in range(mode.http_repeats)
    ]


def check_queued(ctx: Context, database_url: str) -> int:
    """Every stored order's OrderPlaced is in each of its queues; returns the count."""
    engine = database_engine(database_url)
    with engine.connect() as conn:
        stored = int(conn.execute(select(func.count()).select_from(Order)).scalar_one())
    engine.dispose()
    client = redis.Redis.from_url(ctx.redis_url)

    def all_queued() -> bool:
        return all(
            client.llen(keys.pending(q)) >= stored
            for q in envelope.queues_for(envelope.ORDER_PLACED)
        )

    try:
        wait_until(all_queued, 30, 0.05, f"{stored} OrderPlaced events in each of its queues")
    finally:
        client.close()
    return stored


def rows_for(
    label: str, loads: list[vegeta.Load], limit: list[vegeta.Load], note: str
) -> list[Row]:
    """Rate and p50/p95/p99 rows of one server beside the bare stack's."""
    errors = sum(load.errors for load in loads)
    if errors:
        note += f"; {errors} non-201 answers"
    rows = [
        Row(
            SECTION,
            f"POST /orders, {label}",
            "orders/s",
            [x.rate for x in loads],
            "bare Flask on the same gunicorn",
            [x.rate for x in limit],
            note,
        ),
    ]
    for q in (50, 95, 99):
        rows.append(
            Row(
                SECTION,
                f"POST /orders, {label}, latency p{q}",
                "ms",
                [x.p(q) for x in loads],
                f"bare Flask p{q}",
                [x.p(q) for x in limit],
            )
        )
    return rows


def run(ctx: Context) -> list[Row]:
    """Bare stack first, then orders-api on each database."""
    mode = ctx.mode
    body = body_file(ctx)
    vegeta.ensure_vegeta()
    client = redis.Redis.from_url(ctx.redis_url)
    client.flushdb()
    client.close()
    ctx.log(f"intake: bare Flask, {mode.http_repeats} x {mode.http_seconds:g}s")
    url = f"sqlite:///{ctx.scratch('bare') / 'unused.db'}"
    proc, base = start_api(ctx, url, [str(BIN / "python"), "-m", "benchmarks.bare_app"])
    try:
        bare = measure(ctx, base, body)
    finally:
        proc.terminate(15.0)
    rows: list[Row] = []
    note = f"{WORKERS} workers x {THREADS} threads, {mode.http_clients} vegeta workers"
    databases = {
        "SQLite WAL": lambda: f"sqlite:///{ctx.scratch('intake') / 'orders.db'}",
        "PostgreSQL": ctx.postgres_url,
    }
    for label, make_url in databases.items():
        database_url = make_url()
        if database_url is None:
            ctx.log(f"intake: {label} skipped: {ctx.postgres_skipped}")
            continue
        ctx.log(f"intake: orders-api on {label}")
        client = redis.Redis.from_url(ctx.redis_url)
        client.flushdb()
        client.close()
        proc, base = start_api(ctx, database_url)
        try:
            loads = measure(ctx, base, body)
            proc.check_alive()
        finally:
            proc.terminate(15.0)
        stored = check_queued(ctx, database_url)
        accepted = sum(load.ok for load in loads)
        ctx.log(
            f"intake: {label}: {accepted} accepted in the timed runs, {stored} stored, all queued;"
            f" {statistics.median(x.rate for x in loads):.0f} orders/s"
        )
        rows += rows_for(f"orders-api, {label}", loads, bare, note)
    return rows
