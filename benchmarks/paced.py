"""One real consumer with its messages arriving one at a time, at a fixed rate.

``python -m benchmarks.paced shipping [--rate 50] [--jobs 500] [--root DIR]
[--py-spy FILE]`` starts its own Redis, one ``consumer NAME`` process on a fresh
database of its own (and ``smtp-sink`` for ``email``), pushes ``--jobs`` events one by
one at ``--rate`` a second (as an order pipeline at that rate hands them over), waits
for the last ack and prints the consumer's CPU per job, user and system apart, read
from ``/proc``. This is the cost of a message taken alone, the common case below
saturation: a consumer draining a backlog (:mod:`benchmarks.consumer_sweep`) takes
batches and pays the take, the transaction and the ack once per batch.

``--root`` runs the consumer from another checkout (a ``git worktree`` of an older
commit), for before/after pairs in the same conditions. ``--py-spy FILE`` samples the
consumer during the load with ``py-spy record --nonblocking --format raw`` (one stack and
its count per line, flamegraph input).
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

from benchmarks.consumer_sweep import KINDS, jobs_for, start_consumer
from benchmarks.harness import BIN, cpu_user_system
from devtools.procs import wait_until
from devtools.redis_server import RedisServer
from messaging import keys


def run(
    name: str, rate: float, count: int, root: Path | None, spy: Path | None
) -> tuple[float, float]:
    """(user, system) CPU ms per job of one consumer fed ``count`` jobs at ``rate``/s."""
    work = Path(tempfile.mkdtemp(prefix=f"bench-paced-{name}-"))
    server = RedisServer(data_dir=work).start()
    client = redis.Redis.from_url(server.url)
    procs = start_consumer(server.url, work, name, root)
    sampler = None
    try:
        wait_until(lambda: bool(client.scard(keys.workers(name))), 60, 0.01, "the consumer")
        time.sleep(1.0)  # past its start-up
        pid = procs[-1].popen.pid
        if spy is not None:
            sampler = subprocess.Popen(
                [str(BIN / "py-spy"), "record", "--nonblocking", "--rate", "500",
                 "--format", "raw", "--output", str(spy), "--pid", str(pid)],
            )  # fmt: skip
            time.sleep(0.5)
        jobs = jobs_for(name, count)
        user, system = cpu_user_system([pid])
        start = time.perf_counter()
        for n, job in enumerate(jobs):
            client.rpush(keys.pending(name), job)
            pause = start + (n + 1) / rate - time.perf_counter()
            if pause > 0:
                time.sleep(pause)

        def acked() -> bool:
            procs[-1].check_alive()
            return int(client.hget(keys.stats(name), "processed") or 0) >= count

        wait_until(acked, 120, 0.005, f"{count} acks")
        user_end, system_end = cpu_user_system([pid])
    finally:
        if sampler is not None:
            sampler.send_signal(2)
            sampler.wait(30)
        for proc in procs:
            proc.terminate(15.0)
        client.close()
        server.stop()
    return (user_end - user) / count * 1000, (system_end - system) / count * 1000


def main(argv: list[str] | None = None) -> int:
    """Print one consumer's CPU per job with its jobs arriving one at a time."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.paced", description=__doc__)
    parser.add_argument("name", choices=KINDS)
    parser.add_argument("--rate", type=float, default=50.0, help="jobs a second (50)")
    parser.add_argument("--jobs", type=int, default=500, help="jobs in all (500)")
    parser.add_argument("--root", type=Path, default=None, help="run another checkout's code")
    parser.add_argument("--py-spy", type=Path, default=None, help="raw py-spy output file")
    args = parser.parse_args(argv)
    user, system = run(args.name, args.rate, args.jobs, args.root, args.py_spy)
    print(
        f"consumer {args.name}: {args.jobs} jobs at {args.rate:g}/s, one at a time:"
        f" {user + system:.2f} ms CPU per job (user {user:.2f}, system {system:.2f}),"
        f" load average {os.getloadavg()[0]:.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
