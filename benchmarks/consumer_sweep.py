"""How fast one real consumer drains its queue, per batch size and thread count.

``python -m benchmarks.consumer_sweep email [--jobs 1000] [--batch 1,10,50]
[--threads 1,2,4] [--repeats 2] [--root DIR]`` starts its own Redis, then for every
(batch, threads) pair one ``consumer NAME`` process (``CONSUMER_BATCH_SIZE``,
``CONSUMER_CONCURRENCY``) on a fresh database of its own, with the parts it talks to
(``smtp-sink`` for ``email``; the simulated gateway at PAYMENT_LATENCY_MS 10 for
``payment``), stages ``--jobs`` OrderPlaced events (PaymentCaptured for ``invoice`` and
``shipping``) and times the drain from one RENAME to the last ack, as
:mod:`benchmarks.drain` does. It prints jobs/s per pair and the consumer process's CPU
milliseconds per job (steadier than the rate on a shared machine), medians of the repeats.

This is the measurement behind the consumer defaults (``CONSUMER_BATCH_SIZE``,
``CONSUMER_CONCURRENCY``): the README's "Speed, measured" section quotes it.
``--root`` runs the consumer from another checkout of the project (``git archive``
of an older commit), so a before/after pair runs in the same conditions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis

from benchmarks.drain import STAGING, job, release_jobs, stage
from benchmarks.harness import BIN, cpu_seconds
from devtools.procs import Proc, wait_until
from devtools.redis_server import RedisServer, free_port
from messaging import envelope, keys

KINDS = ("payment", "invoice", "shipping", "email")


def jobs_for(name: str, count: int) -> list[bytes]:
    """``count`` new events of the type the consumer works on (new ids, new orders)."""
    if name in ("payment", "email"):
        return [job(n) for n in range(1, count + 1)]
    return [
        envelope.dumps(
            envelope.envelope(
                envelope.PAYMENT_CAPTURED,
                {"order_id": n, "payment_id": f"pay_{n}", "amount": "1.00", "currency": "EUR"},
                message=f"Payment captured for order #{n}",
                sender="benchmark",
                count=n,
            )
        ).encode()
        for n in range(1, count + 1)
    ]


def start_consumer(
    redis_url: str, run: Path, name: str, root: Path | None, **settings: str
) -> list[Proc]:
    """One ``consumer NAME`` on a fresh SQLite database in ``run`` (``smtp-sink`` first for
    ``email``), its settings the benchmark's plus ``settings``; the consumer is last.

    ``root``: run another checkout's code (``git worktree``), with this venv's libraries.
    """
    env = {
        "REDIS_URL": redis_url,
        "LOG_LEVEL": "WARNING",
        f"{name.upper()}_DATABASE_URL": f"sqlite:///{run / f'{name}.db'}",
        "PAYMENT_LATENCY_MS": "10",
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(free_port()),
        "SMTP_SINK_DIR": str(run / "mail"),
        **settings,
    }
    if root is not None:
        env["PYTHONPATH"] = str(root)
        argv = [sys.executable, "-m", "consumers", name]
        sink = [sys.executable, "-m", "consumers.smtp_sink"]
    else:
        argv, sink = [str(BIN / "consumer"), name], [str(BIN / "smtp-sink")]
    procs = [Proc(sink, env, run / "smtp-sink.log", cwd=root)] if name == "email" else []
    procs.append(Proc(argv, env, run / "consumer.log", cwd=root))
    return procs


def drain_once(
    redis_url: str, work: Path, name: str, count: int, batch: int, threads: int, root: Path | None
) -> tuple[float, float, float | None]:
    """(jobs/s, consumer CPU ms per job, ``smtp-sink``'s or None) of one fresh
    ``consumer NAME`` draining ``count``.

    On a shared machine the CPU per job moves less than the wall-clock rate."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    run = Path(tempfile.mkdtemp(prefix=f"{name}-b{batch}-t{threads}-", dir=work))
    procs = start_consumer(
        redis_url,
        run,
        name,
        root,
        CONSUMER_BATCH_SIZE=str(batch),
        CONSUMER_CONCURRENCY=str(threads),
    )
    try:

        def registered() -> bool:
            for proc in procs:
                proc.check_alive()
            return bool(client.scard(keys.workers(name)))

        wait_until(registered, 60, 0.01, "the consumer to register")
        stage(client, jobs_for(name, count), name)
        pids = [proc.popen.pid for proc in procs]
        before = [cpu_seconds([pid]) for pid in pids]
        start = release_jobs(client, name)

        def drained() -> bool:
            procs[-1].check_alive()
            return int(client.hget(keys.stats(name), "processed") or 0) >= count

        wait_until(drained, 120 + count / 5, 0.005, f"{count} acks")
        seconds = time.perf_counter() - start
        used = [cpu_seconds([pid]) - cpu for pid, cpu in zip(pids, before, strict=True)]
    finally:
        for proc in procs:
            proc.terminate(15.0)
        client.delete(STAGING)
        client.close()
    sink = used[0] / count * 1000 if len(used) > 1 else None
    return count / seconds, used[-1] / count * 1000, sink


def main(argv: list[str] | None = None) -> int:
    """Sweep batch sizes and thread counts; print one Markdown table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.consumer_sweep")
    parser.add_argument("name", choices=KINDS)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--batch", default="1,10,50")
    parser.add_argument("--threads", default="1,2,4")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--root", type=Path, default=None, help="run another checkout's code")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batch.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    server = RedisServer(data_dir=work).start()
    rates: dict[tuple[int, int], list[float]] = {}
    cpus: dict[tuple[int, int], list[float]] = {}
    sinks: dict[tuple[int, int], list[float]] = {}
    try:
        for _ in range(args.repeats):  # interleaved: load drifts over the sweep
            for b in batches:
                for t in threads:
                    rate, cpu, sink = drain_once(
                        server.url, work, args.name, args.jobs, b, t, args.root
                    )
                    rates.setdefault((b, t), []).append(rate)
                    cpus.setdefault((b, t), []).append(cpu)
                    if sink is not None:
                        sinks.setdefault((b, t), []).append(sink)
                    also = "" if sink is None else f" (smtp-sink {sink:.2f})"
                    print(f"batch {b}, {t} thread(s): {rate:,.0f} jobs/s, {cpu:.2f} ms CPU/job"
                          f"{also}", file=sys.stderr)  # fmt: skip
    finally:
        server.stop()
    load = os.getloadavg()[0]
    print(f"\n`consumer {args.name}`, {args.jobs} jobs, load average {load:.1f}\n")
    sink_head = " smtp-sink CPU ms per job (median) |" if sinks else ""
    head = "| batch | threads | jobs/s (median) | CPU ms per job (median) |"
    print(f"{head}{sink_head} runs (jobs/s) |")
    print("|---:|---:|---:|---:|" + ("---:|" if sinks else "") + "---|")
    for (b, t), values in rates.items():
        runs = ", ".join(f"{v:,.0f}" for v in values)
        cpu = statistics.median(cpus[(b, t)])
        sink_cell = f" {statistics.median(sinks[(b, t)]):.2f} |" if sinks else ""
        print(f"| {b} | {t} | {statistics.median(values):,.0f} | {cpu:.2f} |{sink_cell} {runs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
