"""Benchmark: how fast one consumer process drains a queue, with acks on.

Not a test. Pre-queues N no-op jobs (OrderPlaced envelopes) and measures, in the same
run and on the same Redis:

1. ``consumer noop`` (the real worker process: parse, handle, ack) with batches of
   100, with batches of 1, and with batches of 100 plus one INFO log line per job;
2. a raw redis-py loop, one BLMOVE + one LREM per job (two round trips per job);
3. a raw batched loop: one Lua call moves 100, one pipeline LREMs 100.

Usage: ``.venv/bin/python benchmarks/consumer_drain.py [--jobs 50000]``. Starts its own
redis-server (no persistence) unless ``--redis-url`` is given.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from consumers.queue import RedisQueue  # noqa: E402
from devtools.redis_server import RedisServer  # noqa: E402
from orders import events, keys  # noqa: E402

QUEUE = keys.NOOP_QUEUE
BIN = Path(sys.executable).parent


def job(n: int) -> bytes:
    """A small, valid OrderPlaced envelope (what the noop handler accepts)."""
    return events.dumps(
        events.envelope(
            events.ORDER_PLACED,
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


def fill(client: redis.Redis, jobs: list[bytes]) -> None:
    """Empty the queue's keys and RPUSH every job (pipelined)."""
    for key in client.scan_iter(match=f"queue:{{{QUEUE}}}:*"):
        client.delete(key)
    pipe = client.pipeline(transaction=False)
    for i in range(0, len(jobs), 1000):
        pipe.rpush(keys.pending(QUEUE), *jobs[i : i + 1000])
    pipe.execute()


def run_consumer(url: str, jobs: list[bytes], batch: int, log_level: str) -> float:
    """Drain with a real ``consumer noop`` process; seconds from registration to empty."""
    client = redis.Redis.from_url(url)
    fill(client, jobs)
    env = {
        **os.environ,
        "REDIS_URL": url,
        "CONSUMER_BATCH_SIZE": str(batch),
        "LOG_LEVEL": log_level,
        "DATABASE_URL": "sqlite:///:memory:",
    }
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen([str(BIN / "consumer"), "noop"], env=env, stdout=out, stderr=out)
        try:
            while not client.scard(keys.workers(QUEUE)):  # started: imports done
                if proc.poll() is not None:
                    raise RuntimeError(f"consumer exited {proc.returncode}")
                time.sleep(0.001)
            start = time.perf_counter()
            while int(client.hget(keys.stats(QUEUE), "processed") or 0) < len(jobs):
                time.sleep(0.002)
            elapsed = time.perf_counter() - start
        finally:
            proc.terminate()
            proc.wait(30)
    client.close()
    return elapsed


def run_raw_single(url: str, jobs: list[bytes]) -> float:
    """One BLMOVE and one LREM per job: the textbook reliable-queue loop."""
    client = redis.Redis.from_url(url)
    fill(client, jobs)
    pending, processing = keys.pending(QUEUE), keys.processing(QUEUE, "raw")
    start = time.perf_counter()
    for _ in range(len(jobs)):
        message = client.blmove(pending, processing, 1, "LEFT", "RIGHT")
        client.lrem(processing, 1, message)
    elapsed = time.perf_counter() - start
    client.close()
    return elapsed


def run_raw_batched(url: str, jobs: list[bytes], batch: int = 100) -> float:
    """One Lua call moves up to 100; one pipeline acks them (LREM each)."""
    client = redis.Redis.from_url(url)
    fill(client, jobs)
    queue = RedisQueue(client, QUEUE)
    processing = keys.processing(QUEUE, "raw")
    start = time.perf_counter()
    done = 0
    while done < len(jobs):
        taken = queue.take("raw", batch, timeout=1)
        pipe = client.pipeline(transaction=False)
        for message in taken:
            pipe.lrem(processing, 1, message)
        pipe.execute()
        done += len(taken)
    elapsed = time.perf_counter() - start
    client.close()
    return elapsed


def main() -> int:
    """Run every mode and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50_000)
    parser.add_argument("--redis-url", default="")
    args = parser.parse_args()
    server = None
    url = args.redis_url
    if not url:
        server = RedisServer(data_dir=Path(tempfile.mkdtemp(prefix="bench-redis-"))).start()
        url = server.url
    try:
        jobs = [job(n) for n in range(1, args.jobs + 1)]
        rows = [
            ("consumer noop, batch 100, ack on", run_consumer(url, jobs, 100, "WARNING")),
            ("consumer noop, batch 100, + INFO line per job", run_consumer(url, jobs, 100, "INFO")),
            ("consumer noop, batch 1, ack on", run_consumer(url, jobs, 1, "WARNING")),
            ("raw redis-py BLMOVE + LREM per job", run_raw_single(url, jobs)),
            ("raw batched: Lua move 100 + pipelined LREM", run_raw_batched(url, jobs)),
        ]
    finally:
        if server is not None:
            server.stop()
    print(f"\n{args.jobs} jobs, one process each, Redis on 127.0.0.1 ({os.cpu_count()} cores)\n")
    print(f"| {'mode':<48} | {'seconds':>8} | {'jobs/s':>9} |")
    print(f"| {'-' * 48} | {'-' * 8}:| {'-' * 9}:|")
    for name, seconds in rows:
        print(f"| {name:<48} | {seconds:>8.2f} | {args.jobs / seconds:>9,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
