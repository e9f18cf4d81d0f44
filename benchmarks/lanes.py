"""Why two lists and not a sorted set: both priority layouts on the drain benchmark's loop.

``python -m benchmarks.lanes [--jobs N] [--repeats R]`` starts its own Redis and, in one
process, drains N jobs with the batched raw loop of ``benchmarks/drain.py`` (one Lua
call takes 100 jobs into a processing list, one pipeline LREMs them), three ways:

- ``lists``: :class:`messaging.queue.RedisQueue` as shipped (pending + express lists,
  the streak rule), all jobs standard, and again with half of them express;
- ``zset``: a sorted-set pending scored ``class * 2**40 + sequence`` (express class 0,
  standard 1, sequence from INCR), taken by one Lua call of ZRANGE + ZREM + RPUSH, the
  layout the seed's "message priorities with Redis sorted sets" suggests.

It also times producing: RPUSH of N jobs (pipelined, 1,000 per command) against ZADD
with a per-job INCR'd score (one script per 1,000 jobs). Prints jobs/s medians; not
part of ``make bench`` (the decision it supports is made, see messaging/queue.py).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import redis

from benchmarks.drain import job
from devtools.redis_server import RedisServer
from messaging import keys
from messaging.queue import RedisQueue

Q = "lanes"
BATCH = 100

_ZPUSH = """
local n = redis.call('INCRBY', KEYS[2], #ARGV - 1) - #ARGV + 1
local base = tonumber(ARGV[1]) * 1099511627776
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], base + n + i - 2, ARGV[i]) end
return #ARGV - 1
"""

_ZTAKE = """
local ms = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
if #ms == 0 then return ms end
redis.call('ZREM', KEYS[1], unpack(ms))
redis.call('RPUSH', KEYS[2], unpack(ms))
return ms
"""


def _drain(client: redis.Redis, take: object, total: int) -> float:
    processing = keys.processing(Q, "raw")
    start = time.perf_counter()
    done = 0
    while done < total:
        taken = take()  # type: ignore[operator]
        if not taken:
            raise RuntimeError(f"empty after {done} of {total}")
        pipe = client.pipeline(transaction=False)
        for message in taken:
            pipe.lrem(processing, 1, message)
        pipe.execute()
        done += len(taken)
    return time.perf_counter() - start


def lists(client: redis.Redis, jobs: list[bytes], express_share: float) -> tuple[float, float]:
    """(push seconds, drain seconds) with the shipped two-list layout."""
    client.flushdb()
    queue = RedisQueue(client, Q)
    cut = int(len(jobs) * (1 - express_share))
    express = [j.replace(b'"version":1', b'"version":1,"priority":"express"') for j in jobs]
    start = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    for i in range(0, cut, 1000):
        pipe.rpush(keys.pending(Q), *jobs[i : min(i + 1000, cut)])
    for i in range(cut, len(jobs), 1000):  # express, behind a backlog: the express list
        pipe.rpush(keys.express(Q), *express[i : min(i + 1000, len(jobs))])
    pipe.execute()
    pushed = time.perf_counter() - start
    drained = _drain(client, lambda: queue.take("raw", BATCH, 0), len(jobs))
    return pushed, drained


def zset(client: redis.Redis, jobs: list[bytes], express_share: float) -> tuple[float, float]:
    """(push seconds, drain seconds) with a sorted-set pending."""
    client.flushdb()
    push = client.register_script(_ZPUSH)
    take = client.register_script(_ZTAKE)
    pending, seq = keys.pending(Q) + ":z", keys.pending(Q) + ":seq"
    processing = keys.processing(Q, "raw")
    cut = int(len(jobs) * (1 - express_share))
    start = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    for i in range(0, len(jobs), 1000):
        chunk = jobs[i : i + 1000]
        pipe_class = 1 if i < cut else 0
        push(keys=[pending, seq], args=[pipe_class, *chunk], client=pipe)
    pipe.execute()
    pushed = time.perf_counter() - start
    drained = _drain(client, lambda: take(keys=[pending, processing], args=[BATCH]), len(jobs))
    return pushed, drained


def main(argv: list[str] | None = None) -> int:
    """Run both layouts, print the medians."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lanes", description=__doc__)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    jobs = [job(i) for i in range(1, args.jobs + 1)]
    work = Path(tempfile.mkdtemp(prefix="lanes-"))
    server = RedisServer(data_dir=work)
    server.start()
    try:
        client = redis.Redis.from_url(server.url)
        results: dict[str, list[tuple[float, float]]] = {}
        for _ in range(args.repeats):  # interleaved: the machine's noise hits each alike
            for name, run, share in (
                ("lists, all standard", lists, 0.0),
                ("lists, half express", lists, 0.5),
                ("zset, all standard", zset, 0.0),
                ("zset, half express", zset, 0.5),
            ):
                results.setdefault(name, []).append(run(client, jobs, share))
        print(f"| layout ({args.jobs:,} jobs, batch {BATCH}) | push jobs/s | take+ack jobs/s |")
        print("| --- | ---: | ---: |")
        for name, runs in results.items():
            push = statistics.median(args.jobs / p for p, _ in runs)
            drain = statistics.median(args.jobs / d for _, d in runs)
            print(f"| {name} | {push:,.0f} | {drain:,.0f} |")
        client.close()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
