"""1. Consumer drain: how fast ``consumer noop`` processes empty a pre-filled queue.

Then horizontal scale on the real handler: 1, 2 and 4 ``consumer payment`` processes
on one queue, each charging through the simulated gateway (PAYMENT_LATENCY_MS per
call, as a card API answers) into the payment service's own SQLite database and
emitting PaymentCaptured, ratio = speed-up over one process. This is what
``docker compose up --scale payment=N`` (or N ``consumer payment`` processes) buys.

The jobs (small valid OrderPlaced envelopes) are pushed to a staging list first; once
every consumer process has registered, one RENAME makes them the pending list, and the
clock runs until the queue's ``processed`` counter (incremented by the ack) reaches N.
Process start-up is therefore not measured, and several processes start together.

Limits, measured on the same Redis in the same run, by a single redis-py client in
this process: one BLMOVE + one LREM per job (the textbook reliable-queue loop), and
the batched form (one Lua call moves B jobs, one pipeline LREMs them).
"""

from __future__ import annotations

import functools
import time

import redis

from benchmarks.harness import BIN, Context, Row, repeat
from devtools.procs import Proc, wait_until
from messaging import envelope, keys
from messaging.queue import RedisQueue

QUEUE = keys.NOOP_QUEUE
STAGING = "bench:staging"
SECTION = "1"


def job(n: int) -> bytes:
    """A small valid OrderPlaced envelope (what the noop handler accepts)."""
    return envelope.dumps(
        envelope.envelope(
            envelope.ORDER_PLACED,
            {
                "order_id": n,
                "customer_email": "bench@example.com",
                "currency": "EUR",
                "lines": [{"sku": "B", "quantity": 1, "unit_price": "1.00", "line_total": "1.00"}],
                "total": "1.00",
            },
            message=f"Order #{n} placed",
            sender="benchmark",
            count=n,
        )
    ).encode()


def stage(client: redis.Redis, jobs: list[bytes], queue: str = QUEUE) -> None:
    """Reset the queue's counters and RPUSH every job to the staging list (pipelined)."""
    client.delete(STAGING, keys.stats(queue), keys.processing(queue, "raw"))
    pipe = client.pipeline(transaction=False)
    for i in range(0, len(jobs), 1000):
        pipe.rpush(STAGING, *jobs[i : i + 1000])
    pipe.execute()


def release_jobs(client: redis.Redis, queue: str = QUEUE) -> float:
    """Make the staged jobs pending in one step; returns the start time."""
    client.rename(STAGING, keys.pending(queue))
    return time.perf_counter()


def consumers_drain(
    ctx: Context,
    jobs: list[bytes],
    *,
    processes: int,
    batch: int,
    repeats: int,
    log_level: str = "WARNING",
    name: str = "noop",
    extra_env: dict[str, str] | None = None,
) -> list[float]:
    """Seconds for ``processes`` real ``consumer NAME`` processes to process and ack all.

    The processes start once and drain the queue ``repeats`` times.
    """
    queue = QUEUE if name == "noop" else name
    client = redis.Redis.from_url(ctx.redis_url)
    client.flushdb()
    env = {
        "REDIS_URL": ctx.redis_url,
        "CONSUMER_BATCH_SIZE": str(batch),
        "LOG_LEVEL": log_level,
        **(extra_env or {}),
    }
    logs = ctx.scratch("drain")
    procs = [
        Proc([str(BIN / "consumer"), name], env, logs / f"consumer-{name}-{i}.log")
        for i in range(processes)
    ]
    times: list[float] = []
    try:

        def registered() -> bool:
            for proc in procs:
                proc.check_alive()
            return client.scard(keys.workers(queue)) >= processes

        wait_until(registered, 60, 0.005, "the consumers to register")

        def drained() -> bool:
            return int(client.hget(keys.stats(queue), "processed") or 0) >= len(jobs)

        for _ in range(repeats):
            stage(client, jobs, queue)
            start = release_jobs(client, queue)
            wait_until(drained, 120 + len(jobs) / 10, 0.002, f"{len(jobs)} acks")
            times.append(time.perf_counter() - start)
            left = client.llen(keys.pending(queue))
            if left:
                raise RuntimeError(f"{left} jobs still pending after the drain")
    finally:
        for proc in procs:
            proc.terminate(15.0)
    client.close()
    return times


PAYMENT_LATENCY_MS = 10
"""Simulated gateway latency per charge in the payment rows (a fast card API)."""


def payment_scaling(ctx: Context) -> list[Row]:
    """1, 2 and 4 ``consumer payment`` processes on one queue, real handler and database.

    All processes share the payment service's one database, as compose's replicas share
    its PostgreSQL database. Each run starts on a fresh database with new event ids, so
    every job is a first charge, never a stored-outcome replay.
    """
    mode = ctx.mode
    count = mode.payment_jobs
    db = ctx.scratch("drain-payment") / "payment.db"
    extra = {
        "PAYMENT_DATABASE_URL": f"sqlite:///{db}",
        "PAYMENT_LATENCY_MS": str(PAYMENT_LATENCY_MS),
    }
    rows: list[Row] = []
    base: list[float] = []
    for processes in mode.drain_processes:
        ctx.log(f"drain: {processes} consumer payment process(es), {count} jobs")
        db.unlink(missing_ok=True)
        jobs = [job(i) for i in range(1, count + 1)]  # new event ids: first charges
        seconds = consumers_drain(
            ctx, jobs, processes=processes, batch=10, repeats=1, name="payment", extra_env=extra
        )
        for _ in range(mode.repeats - 1):
            db.unlink(missing_ok=True)
            jobs = [job(i) for i in range(1, count + 1)]
            seconds += consumers_drain(
                ctx, jobs, processes=processes, batch=10, repeats=1, name="payment",
                extra_env=extra,
            )  # fmt: skip
        values = [count / s for s in seconds]
        if processes == 1:
            base = values
        rows.append(
            Row(
                SECTION,
                f"consumer payment, {processes} process(es), gateway {PAYMENT_LATENCY_MS} ms",
                "jobs/s",
                values,
                "1 process (ratio = speed-up)"
                if processes > 1
                else f"1000 / {PAYMENT_LATENCY_MS} ms",
                base if processes > 1 else [1000 / PAYMENT_LATENCY_MS] * len(values),
                f"{count:,} charges, one SQLite database",
            )
        )
    return rows


def raw_single(ctx: Context, jobs: list[bytes]) -> float:
    """One BLMOVE and one LREM per job, in this process."""
    client = redis.Redis.from_url(ctx.redis_url)
    client.flushdb()
    stage(client, jobs)
    pending, processing = keys.pending(QUEUE), keys.processing(QUEUE, "raw")
    start = release_jobs(client)
    for _ in range(len(jobs)):
        message = client.blmove(pending, processing, 1, "LEFT", "RIGHT")
        client.lrem(processing, 1, message)
    elapsed = time.perf_counter() - start
    client.close()
    return elapsed


def raw_batched(ctx: Context, jobs: list[bytes], batch: int) -> float:
    """One Lua call moves up to ``batch`` jobs; one pipeline LREMs them."""
    client = redis.Redis.from_url(ctx.redis_url)
    client.flushdb()
    stage(client, jobs)
    queue = RedisQueue(client, QUEUE)
    processing = keys.processing(QUEUE, "raw")
    start = release_jobs(client)
    done = 0
    while done < len(jobs):
        taken = queue.take("raw", batch, timeout=1)
        if not taken:
            raise RuntimeError(f"queue empty after {done} of {len(jobs)} jobs")
        pipe = client.pipeline(transaction=False)
        for message in taken:
            pipe.lrem(processing, 1, message)
        pipe.execute()
        done += len(taken)
    elapsed = time.perf_counter() - start
    client.close()
    return elapsed


def run(ctx: Context) -> list[Row]:
    """Every drain row: batch sizes against their raw limit, then the scaling curve.

    Rows that pay one round trip per job (batch 1) use a fifth of the jobs: their rate
    is steady long before, and the quick mode stays quick.
    """
    mode = ctx.mode
    all_jobs = [job(i) for i in range(1, mode.drain_jobs + 1)]

    def jobs_for(batch: int) -> list[bytes]:
        return all_jobs if batch > 1 else all_jobs[: max(1000, len(all_jobs) // 5)]

    def rates(batch: int, seconds: list[float]) -> list[float]:
        return [len(jobs_for(batch)) / s for s in seconds]

    rows: list[Row] = []
    ctx.log(f"drain: raw loops, {mode.drain_jobs} jobs")
    raw: dict[int, list[float]] = {}
    for batch in mode.drain_batches:
        jobs = jobs_for(batch)
        if batch == 1:
            measure = functools.partial(raw_single, ctx, jobs)
        else:
            measure = functools.partial(raw_batched, ctx, jobs, batch)
        raw[batch] = rates(batch, repeat(mode.repeats, measure))
    big = max(mode.drain_batches)
    one_process: list[float] = []
    for batch in mode.drain_batches:
        ctx.log(f"drain: 1 consumer process, batch {batch}")
        seconds = consumers_drain(
            ctx, jobs_for(batch), processes=1, batch=batch, repeats=mode.repeats
        )
        values = rates(batch, seconds)
        if batch == big:
            one_process = values
        limit = f"raw Lua move {batch} + pipelined LREM" if batch > 1 else "raw BLMOVE + LREM"
        rows.append(
            Row(
                SECTION,
                f"consumer noop, 1 process, batch {batch}, ack on",
                "jobs/s",
                values,
                limit,
                raw[batch],
                f"{len(jobs_for(batch)):,} jobs",
            )
        )
    if mode.drain_info_logs:
        ctx.log(f"drain: 1 consumer process, batch {big}, INFO log line per job")
        seconds = consumers_drain(
            ctx, all_jobs, processes=1, batch=big, repeats=mode.repeats, log_level="INFO"
        )
        rows.append(
            Row(
                SECTION,
                f"consumer noop, 1 process, batch {big}, INFO line per job",
                "jobs/s",
                rates(big, seconds),
                f"same, WARNING logs (batch {big})",
                one_process,
            )
        )
    for count in mode.drain_processes:
        if count == 1:
            continue
        ctx.log(f"drain: {count} consumer processes, batch {big}")
        seconds = consumers_drain(ctx, all_jobs, processes=count, batch=big, repeats=mode.repeats)
        rows.append(
            Row(
                SECTION,
                f"consumer noop, {count} processes on one queue, batch {big}",
                "jobs/s",
                rates(big, seconds),
                f"1 process, batch {big} (ratio = speed-up)",
                one_process,
            )
        )
    rows += payment_scaling(ctx)
    return rows
