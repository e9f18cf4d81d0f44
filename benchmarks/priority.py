"""8. Priorities: an express order behind a standard backlog, and standard work under a flood.

One real ``consumer invoice`` process (its batched handler, its own SQLite database,
batch 10) works on the invoice queue, where every paid order passes:

- 2,000 standard PaymentCaptured jobs are made pending in one step, then one express
  job is pushed last; the clock runs until the express order's invoice is committed.
  Its limit is the time the whole standard backlog takes (same run): the express order
  is done in a small fraction of it, not at its end.
- 2,000 standard jobs, then 1,000 express jobs pushed behind them: among the first 550
  invoices (in the order their ids were given), the share of standard orders is the
  anti-starvation rule at work (limit: 1 / (CONSUMER_EXPRESS_RATIO + 1), ratio ~1).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import redis

from benchmarks.drain import release_jobs, stage
from benchmarks.harness import BIN, Context, Row
from devtools.procs import Proc, wait_until
from messaging import envelope, keys
from messaging.queue import DEFAULT_EXPRESS_RATIO, RedisQueue

SECTION = "8"
QUEUE = keys.INVOICE_QUEUE
BACKLOG = 2_000
FLOOD = 1_000
FLOOD_SAMPLE = 550
EXPRESS_BASE = 1_000_000
"""Express jobs' order ids start here (standard ones are 1..BACKLOG)."""


def captured(order_id: int, express: bool = False) -> bytes:
    """A PaymentCaptured job for the invoice queue, express or standard."""
    return envelope.dumps(
        envelope.envelope(
            envelope.PAYMENT_CAPTURED,
            {"order_id": order_id, "payment_id": f"pay_{order_id}", "amount": "1.00",
             "currency": "EUR"},
            message=f"Payment captured for order #{order_id}",
            sender="benchmark",
            count=order_id,
            priority=envelope.EXPRESS if express else envelope.STANDARD,
        )
    ).encode()  # fmt: skip


def _query(db: Path, sql: str) -> list[tuple[int, ...]]:
    try:
        with sqlite3.connect(db, timeout=10) as conn:
            return list(conn.execute(sql))
    except sqlite3.OperationalError:  # the consumer has not created its tables yet
        return []


def run(ctx: Context) -> list[Row]:
    """Both rows, ``ctx.mode.repeats`` runs each, a fresh consumer and database per run."""
    client = redis.Redis.from_url(ctx.redis_url)
    express_s: list[float] = []
    backlog_s: list[float] = []
    shares: list[float] = []
    backlog = [captured(i) for i in range(1, BACKLOG + 1)]
    for attempt in range(ctx.mode.repeats):
        for flood in (False, True):
            client.flushdb()
            db = ctx.scratch("priority") / f"invoice-{attempt}-{int(flood)}.db"
            db.unlink(missing_ok=True)
            env = {
                "REDIS_URL": ctx.redis_url,
                "CONSUMER_BATCH_SIZE": "10",
                "LOG_LEVEL": "WARNING",
                "INVOICE_DATABASE_URL": f"sqlite:///{db}",
            }
            proc = Proc([str(BIN / "consumer"), "invoice"], env, db.with_suffix(".log"))
            try:

                def registered(proc: Proc = proc) -> bool:
                    proc.check_alive()
                    return client.scard(keys.workers(QUEUE)) >= 1

                wait_until(registered, 60, 0.005, "the invoice consumer to register")
                stage(client, backlog, QUEUE)
                queue = RedisQueue(client, QUEUE)

                def done(total: int) -> bool:
                    return int(client.hget(keys.stats(QUEUE), "processed") or 0) >= total

                if not flood:
                    start = release_jobs(client, QUEUE)
                    queue.push(captured(EXPRESS_BASE + 1, express=True))

                    def invoiced(db: Path = db) -> bool:
                        found = f"SELECT 1 FROM invoices WHERE order_id = {EXPRESS_BASE + 1}"
                        return bool(_query(db, found))

                    wait_until(invoiced, 120, 0.002, "the express invoice")
                    express_s.append(time.perf_counter() - start)
                    wait_until(lambda: done(BACKLOG + 1), 600, 0.01, "the backlog")
                    backlog_s.append(time.perf_counter() - start)
                else:
                    release_jobs(client, QUEUE)
                    queue.push(*(captured(EXPRESS_BASE + n, True) for n in range(1, FLOOD + 1)))
                    wait_until(lambda: done(FLOOD_SAMPLE), 600, 0.005, "the first invoices")
                    sql = f"SELECT order_id FROM invoices ORDER BY id LIMIT {FLOOD_SAMPLE}"
                    first = _query(db, sql)
                    shares.append(sum(1 for (o,) in first if o <= BACKLOG) / max(1, len(first)))
            finally:
                proc.terminate(15.0)
    client.close()
    return [
        Row(
            SECTION,
            f"express order pushed behind {BACKLOG:,} standard: invoiced after",
            "s",
            express_s,
            f"the {BACKLOG:,} standard orders' drain",
            backlog_s,
            "1 consumer invoice, batch 10, SQLite",
        ),
        Row(
            SECTION,
            f"standard share of the first {FLOOD_SAMPLE} invoices, {FLOOD:,} express queued",
            "share",
            shares,
            f"1 / (CONSUMER_EXPRESS_RATIO {DEFAULT_EXPRESS_RATIO} + 1)",
            [1 / (DEFAULT_EXPRESS_RATIO + 1)] * len(shares),
            "standard work still progresses",
        ),
    ]
