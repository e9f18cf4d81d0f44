"""Choose orders-api's gunicorn workers and threads by measurement.

``python -m benchmarks.server_sweep [--configs 2x4,2x8,...] [--seconds 5] [--repeats 2]
[--database sqlite|postgresql]`` runs the intake bench's capacity test (vegeta, a closed
loop of 16 workers, a new Idempotency-Key on every request) against bare Flask and
against ``orders-api`` under each ``WEB_CONCURRENCY x WEB_THREADS``, both on the same
gunicorn settings, runs alternating, and prints for each: requests/s of both, their
ratio (the intake row's), latency p50 and p99, and the CPU each answered request cost
the server's processes and Redis (from ``/proc``: it moves far less with the machine's
load than requests a second do).

The worker class is ours (``orders.httpworker.SheddingThreadWorker``, gthread that
sheds stale requests) for both servers; the sweep varies only the counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from benchmarks import vegeta
from benchmarks.harness import BIN, MODES, Context, cpu_seconds, process_tree
from benchmarks.intake import body_file, start_api
from devtools.redis_server import RedisServer

DEFAULT_CONFIGS = "1x8,2x1,2x2,2x4,2x8,2x16,3x4,4x4"


@dataclass
class Figures:
    """One server under one configuration, over the repeats."""

    rates: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)

    def line(self) -> str:
        med = statistics.median
        return (
            f"{med(self.rates):,.0f} req/s, p50/p99 {med(self.p50):.1f}/{med(self.p99):.1f} ms,"
            f" {med(self.cpu_us):,.0f} µs CPU"
        )


def parse_configs(text: str) -> list[tuple[int, int]]:
    """``"2x4,2x8"`` -> [(2, 4), (2, 8)]; argparse prints the error as one line, exit 2."""
    configs = []
    for item in text.split(","):
        workers, sep, threads = item.strip().partition("x")
        if not (sep and workers.isdigit() and threads.isdigit()):
            raise argparse.ArgumentTypeError(f"{item!r} is not WORKERSxTHREADS")
        if not (1 <= int(workers) <= 64 and 1 <= int(threads) <= 64):
            raise argparse.ArgumentTypeError(f"{item!r}: workers and threads must be 1 to 64")
        configs.append((int(workers), int(threads)))
    return configs


def positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    """An argparse type: a number above zero."""

    def convert(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not above zero")
        return value

    return convert


def measure(
    ctx: Context,
    body: Path,
    redis_pid: int,
    database_url: str,
    bare: bool,
    workers: int,
    threads: int,
) -> tuple[float, float, float, float]:
    """One capacity run: (requests/s, p50 ms, p99 ms, CPU µs per answered request)."""
    argv = [str(BIN / "python"), "-m", "benchmarks.bare_app"] if bare else None
    url = f"sqlite:///{ctx.work / 'unused.db'}" if bare else database_url
    env = {"WEB_CONCURRENCY": str(workers), "WEB_THREADS": str(threads)}
    api, base = start_api(ctx, url, argv, env)
    try:
        vegeta.post(f"{base}/orders", body, requests=200, clients=4, ok_status=201)  # warm up
        pids = process_tree(api.popen.pid) + [redis_pid]
        before = cpu_seconds(pids)
        load = vegeta.post(f"{base}/orders", body, seconds=ctx.mode.http_seconds, clients=16)
        used = cpu_seconds(pids) - before
        api.check_alive()
    finally:
        api.terminate(15.0)
    return load.rate, load.p(50), load.p(99), used / max(load.ok, 1) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.server_sweep", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--configs", type=parse_configs, default=DEFAULT_CONFIGS, help="WORKERSxTHREADS,..."
    )
    parser.add_argument("--seconds", type=positive(float), default=5.0, help="each run")
    parser.add_argument(
        "--repeats", type=positive(int), default=2, help="runs per server and config"
    )
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    args = parser.parse_args(argv)
    configs: list[tuple[int, int]] = args.configs
    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    mode = MODES["quick"]
    mode = dataclasses.replace(mode, http_seconds=args.seconds, postgres=True)
    server = RedisServer(data_dir=work).start()
    ctx = Context(mode=mode, work=work, redis_url=server.url)
    client = redis.Redis.from_url(server.url)
    try:
        vegeta.ensure_vegeta()
        body = body_file(ctx)
        redis_pid = int(client.info("server")["process_id"])
        results: dict[tuple[int, int], dict[str, Figures]] = {
            c: {"bare": Figures(), "orders": Figures()} for c in configs
        }
        for repeat in range(args.repeats):
            for workers, threads in configs:
                for name in ("bare", "orders"):
                    client.flushdb()
                    database_url = f"sqlite:///{ctx.scratch('db') / 'orders.db'}"
                    if args.database == "postgresql" and name == "orders":
                        database_url = ctx.postgres_url() or parser.error(ctx.postgres_skipped)
                    rate, p50, p99, cpu = measure(
                        ctx, body, redis_pid, database_url, name == "bare", workers, threads
                    )
                    fig = results[(workers, threads)][name]
                    fig.rates.append(rate)
                    fig.p50.append(p50)
                    fig.p99.append(p99)
                    fig.cpu_us.append(cpu)
                    print(
                        f"[{repeat + 1}/{args.repeats}] {workers}x{threads} {name}:"
                        f" {rate:,.0f} req/s, p50 {p50:.1f} ms, {cpu:,.0f} µs CPU",
                        flush=True,
                    )
        print(
            f"\n{args.database}, {args.seconds:g} s x {args.repeats} per server and config,"
            " medians; CPU per answered request: the server's processes and Redis"
            " (not PostgreSQL)\n"
        )
        print("| workers x threads | orders-api | bare Flask | ratio (median of runs) |")
        print("|---|---|---|---:|")
        for (workers, threads), figs in results.items():
            ratios = [o / b for o, b in zip(figs["orders"].rates, figs["bare"].rates, strict=True)]
            print(
                f"| {workers}x{threads} | {figs['orders'].line()} | {figs['bare'].line()}"
                f" | {statistics.median(ratios):.2f} |"
            )
    finally:
        client.close()
        ctx.close()
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
