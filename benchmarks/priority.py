"""8. Priorities: an express order behind a standard backlog, and standard work under a flood.

One real ``consumer payment`` process (real handler, its own SQLite database, no gateway
latency) works on the payment queue:

- 2,000 standard OrderPlaced jobs are made pending in one step, then one express job
  is pushed last; the clock runs until the express order's payment row is committed.
  Its limit is the time the whole standard backlog takes (same run): the express order
  should be done in a small fraction of it, not at its end.
- 2,000 standard jobs, then 1,000 express jobs pushed behind them: once 550 jobs are
  done, the share of standard ones among the payments is the anti-starvation rule at
  work (limit: 1 / (CONSUMER_EXPRESS_RATIO + 1), ratio about 1).
"""

from __future__ import annotations

import json
import sqlite3
import time

import redis

from benchmarks.drain import job, release_jobs, stage
from benchmarks.harness import BIN, Context, Row
from devtools.procs import Proc, wait_until
from messaging import envelope, keys
from messaging.queue import DEFAULT_EXPRESS_RATIO, RedisQueue

SECTION = "8"
QUEUE = keys.PAYMENT_QUEUE
BACKLOG = 2_000
FLOOD = 1_000
FLOOD_SAMPLE = 550
EXPRESS_BASE = 1_000_000
"""Express jobs' order ids start here (standard ones are 1..BACKLOG)."""


def express_job(n: int) -> bytes:
    """An express OrderPlaced job (envelope and data priority), order id EXPRESS_BASE + n."""
    data = json.loads(job(EXPRESS_BASE + n))
    data["priority"] = envelope.EXPRESS
    data["data"]["priority"] = envelope.EXPRESS
    return envelope.dumps(data).encode()


def _paid(db: str, where: str) -> int:
    with sqlite3.connect(db, timeout=10) as conn:
        return int(conn.execute(f"SELECT COUNT(*) FROM payments WHERE {where}").fetchone()[0])


def run(ctx: Context) -> list[Row]:
    """Both rows, ``ctx.mode.repeats`` runs each, one consumer process per run."""
    client = redis.Redis.from_url(ctx.redis_url)
    express_s: list[float] = []
    backlog_s: list[float] = []
    shares: list[float] = []
    for attempt in range(ctx.mode.repeats):
        for flood in (False, True):
            client.flushdb()
            db = ctx.scratch("priority") / f"payment-{attempt}-{int(flood)}.db"
            db.unlink(missing_ok=True)
            env = {
                "REDIS_URL": ctx.redis_url,
                "CONSUMER_BATCH_SIZE": "10",
                "LOG_LEVEL": "WARNING",
                "DATABASE_URL": "sqlite:///:memory:",
                "PAYMENT_DATABASE_URL": f"sqlite:///{db}",
                "PAYMENT_LATENCY_MS": "0",
            }
            proc = Proc([str(BIN / "consumer"), "payment"], env, db.with_suffix(".log"))
            try:

                def registered(proc: Proc = proc) -> bool:
                    proc.check_alive()
                    return client.scard(keys.workers(QUEUE)) >= 1

                wait_until(registered, 60, 0.005, "the payment consumer to register")
                stage(client, [job(i) for i in range(1, BACKLOG + 1)], QUEUE)
                queue = RedisQueue(client, QUEUE)

                def done(total: int) -> bool:
                    return int(client.hget(keys.stats(QUEUE), "processed") or 0) >= total

                if not flood:
                    start = release_jobs(client, QUEUE)
                    queue.push(express_job(1))
                    wait_until(
                        lambda db=str(db): _paid(db, f"order_id = {EXPRESS_BASE + 1}") == 1,
                        120, 0.002, "the express payment",
                    )  # fmt: skip
                    express_s.append(time.perf_counter() - start)
                    wait_until(lambda: done(BACKLOG + 1), 600, 0.01, "the backlog")
                    backlog_s.append(time.perf_counter() - start)
                else:
                    release_jobs(client, QUEUE)
                    queue.push(*(express_job(n) for n in range(1, FLOOD + 1)))
                    wait_until(lambda: done(FLOOD_SAMPLE), 600, 0.002, "the first jobs")
                    standard = _paid(str(db), f"order_id <= {BACKLOG}")
                    express = _paid(str(db), f"order_id > {EXPRESS_BASE}")
                    shares.append(standard / max(1, standard + express))
            finally:
                proc.terminate(15.0)
    client.close()
    return [
        Row(
            SECTION,
            f"express order pushed behind {BACKLOG:,} standard: paid after",
            "s",
            express_s,
            f"the {BACKLOG:,} standard orders' drain",
            backlog_s,
            "1 consumer payment, batch 10, SQLite",
        ),
        Row(
            SECTION,
            f"standard share of the first {FLOOD_SAMPLE} payments, {FLOOD:,} express queued",
            "share",
            shares,
            f"1 / (CONSUMER_EXPRESS_RATIO {DEFAULT_EXPRESS_RATIO} + 1)",
            [1 / (DEFAULT_EXPRESS_RATIO + 1)] * len(shares),
            "standard work still progresses",
        ),
    ]
