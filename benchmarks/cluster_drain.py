"""Drain rate of ``consumer noop`` processes on a real Redis Cluster: 1, 2, 4 processes.

Starts a local cluster (3 masters, 1 replica each, AOF everysec) with the bundled
redis-server, or uses ``--seed redis://host:port`` of an existing one. For each process
count: start the workers (REDIS_CLUSTER=1), wait until they are registered, RPUSH
``--jobs`` OrderPlaced envelopes to the noop queue and time until every one is acked.

One queue is one hash slot, so one master serves it: adding processes scales until that
master (or the consumers' CPU) is the limit. The three order queues live on different
masters, so their consumers do not compete for one server.

    .venv/bin/python benchmarks/cluster_drain.py [--jobs 20000] [--procs 1 2 4]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devtools.redis_server import RedisCluster  # noqa: E402
from messaging import envelope, keys  # noqa: E402
from messaging.config import Settings  # noqa: E402
from messaging.connection import redis_client  # noqa: E402
from messaging.queue import RedisQueue  # noqa: E402

BIN = Path(sys.executable).parent


def _jobs(count: int) -> list[str]:
    return [
        envelope.dumps(
            envelope.envelope(
                envelope.ORDER_PLACED, {"order_id": n}, message="bench", sender="bench", count=n
            )
        )
        for n in range(count)
    ]


def drain(seed: str, procs: int, jobs: list[str], batch: int) -> float:
    """Jobs per second for ``procs`` worker processes; the queue is emptied first."""
    env = {**os.environ, "REDIS_URL": seed, "REDIS_CLUSTER": "1", "LOG_LEVEL": "WARNING"}
    env["CONSUMER_BATCH_SIZE"] = str(batch)
    client = redis_client(Settings.from_env(env), decode_responses=False)
    client.flushall()
    queue = RedisQueue(client, keys.NOOP_QUEUE)
    workers = [
        subprocess.Popen([str(BIN / "consumer"), "noop"], env=env, stdout=subprocess.DEVNULL)
        for _ in range(procs)
    ]
    try:
        deadline = time.monotonic() + 60
        while client.scard(keys.workers(keys.NOOP_QUEUE)) < procs:
            if time.monotonic() > deadline:
                raise RuntimeError("workers did not register within 60 s")
            time.sleep(0.05)
        started = time.perf_counter()
        for i in range(0, len(jobs), 1000):
            queue.push(*jobs[i : i + 1000])
        while queue.stats()["processed"] < len(jobs):
            if time.perf_counter() - started > 600:
                raise RuntimeError("drain did not finish within 600 s")
            time.sleep(0.01)
        elapsed = time.perf_counter() - started
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(30)
        client.close()
    return len(jobs) / elapsed


def main(argv: list[str] | None = None) -> int:
    """Print a jobs/s table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, default=10, help="CONSUMER_BATCH_SIZE")
    parser.add_argument("--seed", help="redis:// URL of a node of an existing cluster")
    args = parser.parse_args(argv)
    cluster = None
    seed = args.seed
    if not seed:
        cluster = RedisCluster(root=Path(tempfile.mkdtemp(prefix="bench-cluster-"))).start()
        seed = cluster.url
    jobs = _jobs(args.jobs)
    try:
        print(f"cluster drain: {args.jobs} noop jobs, batch {args.batch}, seed {seed}")
        print(f"{'processes':>9}  {'jobs/s':>8}")
        for procs in args.procs:
            print(f"{procs:>9}  {drain(seed, procs, jobs, args.batch):>8.0f}", flush=True)
    finally:
        if cluster is not None:
            cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
