"""Profile the hot paths: a POST /orders, the consumer loop, the whole order pipeline.

``python -m benchmarks.profiling pipeline [--rate 50] [--seconds 5] [--idle]`` runs the
end-to-end benchmark's pipeline (orders-api, every consumer, orders-updates, smtp-sink;
benchmarks/e2e.py) with py-spy attached to every process for the whole load and until
every order has every effect, then prints each process's CPU per order by layer (with
``--idle`` also the time its threads spent waiting: SMTP round trips, lock waits) and
the e2e latencies of that run. The collapsed stacks go to
``bench-results/profile-pipeline-<process>.txt`` (flamegraph input).

``python -m benchmarks.profiling pipeline-cpu [--rate 50] [--seconds 5]`` runs the same
pipeline without a sampler and prints the CPU each process (Redis included) was charged
per order, read from ``/proc``: py-spy counts a consumer blocked in BLMOVE as running.

``python -m benchmarks.profiling server [--rate 200] [--seconds 10] [--database ...]``
samples the real ``orders-api`` (gunicorn workers) with py-spy while vegeta offers
orders at a fixed rate, and prints the CPU time per order by layer: the figure to
quote for "where does an order's CPU go".

``python -m benchmarks.profiling cpu [--rate 150] [--seconds 8] [--database ...]``
offers the same fixed rate to bare Flask and to ``orders-api`` (the bench's server
settings) and prints the CPU each request cost every process that serves it: the
server's master and workers, Redis and PostgreSQL. CPU seconds do not move with the
machine's load the way requests a second do, so this is the figure to compare two
versions of the order path on a shared machine (their ratio is what the intake row's
ratio would be on an idle one, less the load tool's share).

``python -m benchmarks.profiling email [--count 2000] [--batch 10]`` runs the email
service's ``handle_batch`` in this process against a real ``smtp-sink`` (SQLite, no
queue) and prints its CPU per email, then pyinstrument's split by layer.

``python -m benchmarks.profiling post [--count 2000] [--database sqlite|postgresql]``
calls the real Flask app's WSGI callable (no HTTP server and no test client, so what it
measures is our code, Flask, SQLAlchemy, the driver and Redis) and prints the CPU per
POST beside bare Flask's called the same way, then where the time goes by layer
(pyinstrument) and pyinstrument's tree;
``drain`` profiles one consumer thread draining no-op jobs (take, parse, handle, ack) in
this process. Both start their own Redis server; the HTML profiles go to
``bench-results/profile-*.html``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import redis
from pyinstrument import Profiler

from benchmarks.harness import (
    RESULTS_DIR,
    cpu_seconds,
    cpu_user_system,
    process_tree,
    stat_cpu,
)
from devtools.redis_server import RedisServer

LAYERS = (
    # (layer, substring of the frame's file path or function); the first match wins,
    # walking from the sampled frame up to the root, so driver calls count as database
    # even when SQLAlchemy called them.
    (
        "database driver (sqlite3/psycopg: execute, commit)",
        (
            "do_execute",
            "do_commit",
            "do_executemany",
            "psycopg/",
            "_sqlite",
            "sqlite3/",
            "do_begin",
            "do_rollback",
            # the fast paths' statements on the cursor (messaging.database)
            "DriverStatement.",
            "DriverInsert.",
            "driver_transaction",
        ),
    ),
    ("Redis (redis-py, socket)", ("redis/", "hiredis")),
    # smtp_sink: the stand-in mail server is SMTP work, not the order pipeline's own code
    ("SMTP and the email package", ("smtplib", "/email/", "smtp_sink")),
    ("SQLAlchemy (ORM/Core, Python)", ("sqlalchemy/",)),
    ("Flask/Werkzeug", ("flask/", "werkzeug/")),
    ("gunicorn (the WSGI server)", ("gunicorn/",)),
    ("our code (orders/, consumers/, messaging/)", ("/orders/", "/consumers/", "/messaging/")),
    ("json", ("json/",)),
)


def layer_split(profiler: Profiler) -> dict[str, float]:
    """Seconds per layer: each leaf's self time goes to the innermost matching frame."""
    totals: dict[str, float] = defaultdict(float)
    session = profiler.last_session
    assert session is not None
    root = session.root_frame()
    if root is None:
        return {}

    def walk(frame: Any, stack: list[Any]) -> None:
        stack.append(frame)
        own = frame.time - sum(child.time for child in frame.children)
        if own > 0:
            totals[_layer(stack)] += own
        for child in frame.children:
            walk(child, stack)
        stack.pop()

    walk(root, [])
    return dict(totals)


def _layer(stack: list[Any]) -> str:
    for frame in reversed(stack):
        where = f"{frame.file_path or ''}:{frame.function or ''}"
        for layer, needles in LAYERS:
            if any(needle in where for needle in needles):
                return layer
    return "other (stdlib, interpreter)"


def print_split(title: str, totals: dict[str, float], count: int) -> None:
    """The per-layer table: share of the time and microseconds per request or job."""
    total = sum(totals.values()) or 1.0
    print(f"\n{title}\n")
    print("| layer | share | µs per item |")
    print("|---|---:|---:|")
    for layer, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {layer} | {seconds / total:.0%} | {seconds / count * 1e6:,.0f} |")


def profile_post(redis_url: str, database_url: str, count: int) -> None:
    """``count`` POST /orders through the app's WSGI callable: CPU, then pyinstrument.

    The requests' WSGI environments are built beforehand and the app is called directly:
    the Flask test client would add its own request building and response wrapping
    (about a third of what it reported before). A first pass without the profiler gives
    the CPU per POST, in the request thread and in the whole process (the background
    publisher and outbox marker that each POST hands work to), beside bare Flask's
    (benchmarks/bare_app.py) called the same way; a second pass is profiled.
    """
    from werkzeug.test import EnvironBuilder

    from benchmarks.bare_app import create_bare_app
    from benchmarks.intake import ORDER
    from tests.orders_app import build_app

    # All requests come from one client: the per-IP rate limit would answer 429.
    app = build_app(database_url, redis_url, "both", RATE_LIMIT_PER_MINUTE="0")
    statuses: list[str] = []

    def start_response(status: str, _headers: Any, _exc_info: Any = None) -> None:
        statuses.append(status)

    def environs(prefix: str, n: int) -> list[dict[str, Any]]:
        # A new Idempotency-Key on every request, as clients should.
        return [
            EnvironBuilder(
                path="/orders",
                method="POST",
                json=ORDER,
                headers={"Idempotency-Key": f"{prefix}-{i}"},
            ).get_environ()
            for i in range(n)
        ]

    def cpu_per_request(wsgi: Any, prefix: str) -> tuple[float, float]:
        batch = environs(prefix, count)
        statuses.clear()
        thread, process = time.thread_time(), time.process_time()
        for environ in batch:
            b"".join(wsgi(environ, start_response))
        time.sleep(0.2)  # the background threads finish their share
        thread, process = time.thread_time() - thread, time.process_time() - process
        if statuses != ["201 CREATED"] * count:
            raise RuntimeError(f"POST /orders answered {sorted(set(statuses))}")
        return thread / count * 1e6, process / count * 1e6

    cpu_per_request(app, "warm")  # connections, statement caches
    thread, process = cpu_per_request(app, "cpu")
    bare, _ = cpu_per_request(create_bare_app(), "bare")
    timed = environs("key", count)
    statuses.clear()
    profiler = Profiler(interval=0.0002)
    start = time.perf_counter()
    profiler.start()
    for environ in timed:
        b"".join(app(environ, start_response))
    profiler.stop()
    elapsed = time.perf_counter() - start
    if statuses != ["201 CREATED"] * count:
        raise RuntimeError(f"POST /orders answered {sorted(set(statuses))}")
    publisher = app.extensions.get("orders.publisher")  # orders.api.PUBLISHER
    if publisher is not None:
        publisher.close()
    app.extensions["orders"].close()
    print(
        f"CPU per POST, no profiler, {count} requests: {thread:,.0f} µs in the request "
        f"thread, {process:,.0f} µs in the process; bare Flask the same way: {bare:,.0f} µs"
    )
    print(f"profiled: {count} POST /orders in {elapsed:.2f}s: {count / elapsed:,.0f}/s")
    print_split("POST /orders, time by layer", layer_split(profiler), count)
    _save(profiler, "post")


def profile_drain(redis_url: str, count: int, batch: int) -> None:
    """One Worker thread drains ``count`` no-op jobs in this process, under pyinstrument."""
    from benchmarks.drain import job
    from consumers.noop import NoopHandler
    from messaging import keys
    from messaging.publisher import EventPublisher
    from messaging.queue import RedisQueue
    from messaging.worker import Worker

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    jobs = [job(i) for i in range(1, count + 1)]
    for i in range(0, count, 1000):
        client.rpush(keys.pending(keys.NOOP_QUEUE), *jobs[i : i + 1000])
    stop = threading.Event()
    worker = Worker(
        RedisQueue(client, keys.NOOP_QUEUE),
        NoopHandler(),
        EventPublisher(client, "both"),
        batch_size=batch,
        stop=stop,
    )

    def watch() -> None:  # stops the loop once every job is acked
        while int(client.hget(keys.stats(keys.NOOP_QUEUE), "processed") or 0) < count:
            time.sleep(0.005)
        stop.set()

    threading.Thread(target=watch, daemon=True).start()
    profiler = Profiler(interval=0.0005)
    start = time.perf_counter()
    profiler.start()
    worker._consume()  # the thread body, here in the profiled main thread
    profiler.stop()
    elapsed = time.perf_counter() - start
    print(f"{count} no-op jobs, batch {batch}, in {elapsed:.2f}s: {count / elapsed:,.0f} jobs/s")
    print_split("consumer loop, time by layer", layer_split(profiler), count)
    _save(profiler, "drain")


def profile_email(work: Path, count: int, batch: int) -> None:
    """The email service's ``handle_batch`` in this process against a real ``smtp-sink``.

    Batches of ``batch`` new OrderPlaced events (claims, rendering, SMTP, the "sent"
    records) on an SQLite file, under pyinstrument after a warm-up; prints the CPU per
    email this process was charged (``time.process_time``, without the profiler) and the
    split by layer. The queue and Redis are left out: this is the handler's own cost.
    """
    from consumers import store
    from consumers.email import EmailHandler
    from devtools.procs import Proc
    from devtools.redis_server import free_port
    from messaging import envelope

    port = free_port()
    sink = Proc(
        [str(Path(sys.executable).parent / "smtp-sink")],
        {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(port), "SMTP_SINK_DIR": str(work / "mail"),
         "LOG_LEVEL": "WARNING"},
        work / "smtp-sink.log",
    )  # fmt: skip
    engine = store.make_engine(f"sqlite:///{work / 'email.db'}")
    store.create_tables(engine, "email")
    handler = EmailHandler(engine, host="127.0.0.1", port=port, sender="orders@example.com")

    lines = [
        {"sku": "BOOK-1", "quantity": 2, "unit_price": "12.50", "line_total": "25.00"},
        {"sku": "PEN-7", "quantity": 1, "unit_price": "3.20", "line_total": "3.20"},
    ]

    def batches(first: int, emails: int) -> list[list[dict[str, Any]]]:
        events = [
            envelope.envelope(
                envelope.ORDER_PLACED,
                {
                    "order_id": n,
                    "customer_email": f"c{n}@example.com",
                    "currency": "EUR",
                    "lines": lines,
                    "total": "28.20",
                },
                message=f"Order #{n} placed",
                sender="orders-api",
                count=n,
            )  # fmt: skip
            for n in range(first, first + emails)
        ]
        return [events[i : i + batch] for i in range(0, emails, batch)]

    try:
        wait_until_listening(port, sink)
        for taken in batches(1, 20 * batch):  # warm up: connections, statement caches
            handler.handle_batch(taken)
        timed = batches(1 + 20 * batch, count)
        cpu = time.process_time()
        for taken in timed[: len(timed) // 2]:
            handler.handle_batch(taken)
        half = len(timed) // 2 * batch
        per_email = (time.process_time() - cpu) / half * 1e6
        print(f"email handle_batch, batch {batch}: {per_email:,.0f} µs CPU per email here")
        profiler = Profiler(interval=0.0005)
        profiler.start()
        for taken in timed[len(timed) // 2 :]:
            handler.handle_batch(taken)
        profiler.stop()
        print_split("email handle_batch, time by layer", layer_split(profiler), count - half)
        _save(profiler, "email")
    finally:
        handler.close()
        engine.dispose()
        sink.terminate(10.0)


def wait_until_listening(port: int, proc: Any) -> None:
    """Until something accepts connections on 127.0.0.1:``port`` (``proc`` alive)."""
    import socket

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        proc.check_alive()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def profile_server(redis_url: str, database_url: str, seconds: float, rate: float) -> None:
    """py-spy over the real orders-api (gunicorn workers) while vegeta POSTs orders.

    Samples only threads on the CPU (py-spy's default: no idle frames), so the split is
    of CPU time, not of waiting. Every worker is sampled, relay and marker included.
    """
    from benchmarks import vegeta
    from benchmarks.harness import BIN, MODES, Context
    from benchmarks.intake import body_file, start_api

    py_spy = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    if py_spy is None:
        raise RuntimeError("py-spy is missing: pip install py-spy")
    work = Path(tempfile.mkdtemp(prefix="bench-spy-"))
    ctx = Context(mode=MODES["quick"], work=work, redis_url=redis_url)
    api, base = start_api(ctx, database_url)
    out = RESULTS_DIR / "profile-server.txt"
    RESULTS_DIR.mkdir(exist_ok=True)
    try:
        vegeta.post(f"{base}/orders", body_file(ctx), requests=200, clients=4)  # warm up
        children = subprocess.run(
            ["pgrep", "-P", str(api.popen.pid)], capture_output=True, text=True, check=True
        ).stdout.split()
        spies = [
            subprocess.Popen(
                [
                    py_spy,
                    "record",
                    "--pid",
                    pid,
                    "--duration",
                    str(int(seconds)),
                    "--rate",
                    "200",
                    "--format",
                    "raw",
                    "--nonblocking",
                    "--output",
                    str(work / f"spy-{pid}.txt"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            for pid in children
        ]
        load = vegeta.post(f"{base}/orders", body_file(ctx), seconds=seconds, rate=rate)
        for spy in spies:
            spy.wait(60)
    finally:
        api.terminate(15.0)
    totals: dict[str, float] = defaultdict(float)
    lines = []
    for path in work.glob("spy-*.txt"):
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack:
                continue
            lines.append(line)
            frames = stack.split(";")
            totals[_layer_of_names(frames)] += int(count)
    out.write_text("\n".join(lines) + "\n")
    print(f"{load.ok} POST /orders in {load.seconds:.1f}s ({load.rate:.0f}/s offered {rate:g}/s)")
    samples = sum(totals.values()) or 1
    print_split(
        "orders-api CPU by layer (py-spy, every worker thread)",
        {k: v / 200 for k, v in totals.items()},  # samples at 200 Hz -> seconds
        max(load.ok, 1),
    )
    print(f"\n{samples:.0f} samples; collapsed stacks (flamegraph input): {out}")


def thread_cpu(pids: list[int]) -> dict[tuple[int, int], float]:
    """User + system CPU seconds of every thread of these processes, from ``/proc``."""
    found: dict[tuple[int, int], float] = {}
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            cpu = stat_cpu(task / "stat")
            if cpu is not None:
                found[(pid, int(task.name))] = sum(cpu)
    return found


THREAD_ROLES = {
    "MainThread": "main thread (gunicorn's accept and keep-alive loop)",
    "ThreadPoolExecutor": "request threads (gthread's pool)",
    "outbox-publisher": "outbox-publisher (publishes what requests committed)",
    "outbox-marker": "outbox-marker (marks published rows)",
    "outbox-relay": "outbox-relay (polls the outbox)",
}


def thread_roles(py_spy: str | None, pids: list[int]) -> dict[int, str]:
    """Thread id -> role, from the Python thread names ``py-spy dump`` shows."""
    roles: dict[int, str] = {}
    if py_spy is None:
        return roles
    for pid in pids:
        try:
            dump = subprocess.run(
                [py_spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=60
            ).stdout
        except (OSError, subprocess.SubprocessError):  # no ptrace here: threads unnamed
            continue
        for match in re.finditer(r'^Thread (\d+) \(\w+\): "([^"]*)"', dump, re.MULTILINE):
            name = match.group(2)
            roles[int(match.group(1))] = next(
                (role for prefix, role in THREAD_ROLES.items() if name.startswith(prefix)),
                name,
            )
    return roles


def profile_cpu(
    redis_url: str, database_url: str, postmaster: int | None, seconds: float, rate: float
) -> None:
    """CPU per request of bare Flask and of orders-api at one offered rate (0: as fast as
    16 clients get answers), in total and by thread: the gunicorn master, each worker's
    threads by role (named by ``py-spy dump`` when py-spy is there), Redis, PostgreSQL."""
    from benchmarks import vegeta
    from benchmarks.harness import BIN, MODES, Context
    from benchmarks.intake import body_file, start_api

    py_spy = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    work = Path(tempfile.mkdtemp(prefix="bench-cpu-"))
    ctx = Context(mode=MODES["quick"], work=work, redis_url=redis_url)
    client = redis.Redis.from_url(redis_url)
    redis_pid = int(client.info("server")["process_id"])
    client.close()
    body = body_file(ctx)
    offered = f"{rate:g} requests/s offered" if rate else "16 clients as fast as answered"
    print(f"{offered} for {seconds:g} s to each server\n")
    print("| server | answered | CPU µs per request (server, Redis, database) | p50 ms |")
    print("|---|---:|---:|---:|")
    splits: dict[str, dict[str, float]] = {}
    for name, argv in (
        ("bare Flask", [str(BIN / "python"), "-m", "benchmarks.bare_app"]),
        ("orders-api", None),
    ):
        url = database_url if argv is None else f"sqlite:///{work / 'unused.db'}"
        api, base = start_api(ctx, url, argv)
        try:
            vegeta.post(f"{base}/orders", body, requests=200, clients=4)  # warm up
            server_pids = process_tree(api.popen.pid)
            others = {redis_pid: "redis-server"}
            if postmaster is not None and argv is None:
                others.update(dict.fromkeys(process_tree(postmaster), "PostgreSQL"))
            pids = server_pids + list(others)
            before = thread_cpu(pids)
            load = vegeta.post(f"{base}/orders", body, seconds=seconds, rate=rate)
            after = thread_cpu(pids)
            roles = thread_roles(py_spy, server_pids[1:])
        finally:
            api.terminate(15.0)
        answered = max(load.ok, 1)
        split: dict[str, float] = defaultdict(float)
        for (pid, tid), cpu in after.items():
            if pid in others:
                role = others[pid]
            elif pid == server_pids[0]:
                role = "gunicorn master"
            else:
                role = roles.get(tid, "other threads")
            split[role] += (cpu - before.get((pid, tid), 0.0)) / answered * 1e6
        splits[name] = split
        used = sum(split.values())
        print(f"| {name} | {load.ok} | {used:,.0f} | {load.p(50):.1f} |")
    print("\nCPU µs per request by thread (every worker's threads of one role together)\n")
    print("| thread | bare Flask | orders-api |")
    print("|---|---:|---:|")
    bare, ours = splits["bare Flask"], splits["orders-api"]
    for role in sorted(set(bare) | set(ours), key=lambda r: -ours.get(r, 0.0)):
        print(f"| {role} | {bare.get(role, 0.0):,.0f} | {ours.get(role, 0.0):,.0f} |")


def _run_pipeline(ctx: Any, rate: int, seconds: float, observe: Any) -> int:
    """One e2e run (benchmarks/e2e.py) with ``observe``; prints its latencies, returns
    the orders accepted (at least 1)."""
    from benchmarks import e2e
    from benchmarks.harness import percentile

    result = e2e.one_run(ctx, rate=rate, seconds=seconds, observe=observe)
    orders = max(int(result["accepted"]), 1)  # type: ignore[arg-type]
    print(
        f"pipeline: {orders} orders at {rate}/s offered for {seconds:g}s"
        f" ({result['accepted_rate']:.1f}/s accepted), {int(result['lost'])} lost"  # type: ignore[arg-type]
    )
    for kind in (*e2e.EFFECTS, "all"):
        values = result[kind]
        assert isinstance(values, list)
        figures = "/".join(f"{percentile(values, q):,.0f}" for q in (50, 95, 99, 100))
        print(f"  POST to {kind}: p50/p95/p99/max {figures} ms")
    return orders


def pipeline_cpu(redis_url: str, seconds: float, rate: int) -> None:
    """CPU per order of each process of the end-to-end pipeline, read from ``/proc``.

    No sampler: py-spy cannot tell a thread blocked in a socket read (a worker waiting in
    BLMOVE) from one running, so its "CPU" overstates idle consumers; ``/proc`` counts
    what the kernel charged each process (gunicorn's workers included) from the start
    of the load until every effect was in, Redis too.
    """
    from benchmarks.harness import MODES, Context

    work = Path(tempfile.mkdtemp(prefix="bench-cpu-"))
    ctx = Context(mode=MODES["quick"], work=work, redis_url=redis_url)
    client = redis.Redis.from_url(redis_url)
    pids = {"redis": int(client.info("server")["process_id"])}
    client.close()
    spent: dict[str, float] = {}

    def observe(started: dict[str, int]) -> Any:
        trees = {name: process_tree(pid) for name, pid in {**started, **pids}.items()}
        before = {name: cpu_seconds(tree) for name, tree in trees.items()}
        began = time.monotonic()

        def finish() -> None:
            spent.update({name: cpu_seconds(trees[name]) - before[name] for name in trees})
            spent["(wall)"] = time.monotonic() - began

        return finish

    orders = _run_pipeline(ctx, rate, seconds, observe)
    wall = spent.pop("(wall)")
    total = sum(spent.values())
    print(f"\nCPU from /proc over {wall:.1f} s (load until the last effect), per order:")
    print("| process | CPU ms per order | share of one core |")
    print("|---|---:|---:|")
    for name, cpu in sorted(spent.items(), key=lambda item: -item[1]):
        print(f"| {name} | {cpu / orders * 1000:.2f} | {cpu / wall:.0%} |")
    print(f"| all | {total / orders * 1000:.2f} | {total / wall:.0%} |")


def timeline(redis_url: str, seconds: float, rate: int, step: float = 0.25) -> None:
    """The end-to-end pipeline second by second: what each process's CPU and the email
    queue did while the orders of that second went through, and how slow they were.

    Made to tell apart runs of the same code whose tails differ by fifty times (session
    29: smtp-sink's CPU doubled in the slow ones, from the first second, as the file
    system's cost per new file did; ``benchmarks.fs_create``). A thread reads each
    process's CPU from ``/proc`` and the queues' depths every ``step`` seconds.
    """
    from benchmarks import e2e
    from benchmarks.harness import MODES, Context, percentile
    from messaging import keys

    work = Path(tempfile.mkdtemp(prefix="bench-timeline-"))
    ctx = Context(mode=MODES["quick"], work=work, redis_url=redis_url)
    client = redis.Redis.from_url(redis_url)
    redis_pid = int(client.info("server")["process_id"])
    samples: list[tuple[float, dict[str, float], int]] = []
    stop = threading.Event()

    def observe(started: dict[str, int]) -> Any:
        trees = {name: process_tree(pid) for name, pid in {**started, "redis": redis_pid}.items()}

        def sample() -> None:
            while not stop.is_set():
                depth = sum(
                    int(n)
                    for n in client.pipeline(transaction=False)
                    .llen(keys.pending(keys.EMAIL_QUEUE))
                    .llen(keys.express(keys.EMAIL_QUEUE))
                    .execute()
                )
                cpu = {name: cpu_seconds(tree) for name, tree in trees.items()}
                samples.append((time.time(), cpu, depth))
                stop.wait(step)

        thread = threading.Thread(target=sample, name="timeline", daemon=True)
        thread.start()

        def finish() -> None:
            stop.set()
            thread.join(5)

        return finish

    try:
        result = e2e.one_run(ctx, rate=rate, seconds=seconds, observe=observe)
    finally:
        stop.set()
        client.close()
    placed, done = result["placed_at"], result["done_at"]
    assert isinstance(placed, list) and isinstance(done, list)
    if not placed or len(samples) < 2:
        print("timeline: no complete order or no samples")
        return
    print(
        f"timeline: {len(placed)} complete orders at {rate}/s offered for {seconds:g}s;"
        f" all effects p50/p99/max {percentile(result['all'], 50):,.0f}"  # type: ignore[arg-type]
        f"/{percentile(result['all'], 99):,.0f}/{percentile(result['all'], 100):,.0f} ms"  # type: ignore[arg-type]
    )
    names = list(samples[0][1])
    began = min(placed)
    print("\nCPU in % of one core over each second, the email queue's deepest, and the")
    print("slowest order placed in that second (POST to its last effect):\n")
    print(f"| s | placed | done | email queue | {' | '.join(names)} | all | slowest ms |")
    print("|" + "---:|" * (6 + len(names)))
    last = max(max(done), samples[-1][0])
    for second in range(int(last - began) + 1):
        low, high = began + second, began + second + 1
        inside = [x for x in samples if low <= x[0] < high]
        before = [x for x in samples if x[0] < low]
        if not inside or not before:
            continue
        first, end = before[-1], inside[-1]
        span = end[0] - first[0]
        cpu = [(end[1][n] - first[1][n]) / span * 100 for n in names]
        slowest = [(d - p) * 1000 for p, d in zip(placed, done, strict=True) if low <= p < high]
        print(
            f"| {second} | {sum(low <= p < high for p in placed)}"
            f" | {sum(low <= d < high for d in done)} | {max(x[2] for x in inside)}"
            f" | {' | '.join(f'{c:.0f}' for c in cpu)} | {sum(cpu):.0f}"
            f" | {f'{max(slowest):,.0f}' if slowest else '-'} |"
        )


def profile_pipeline(redis_url: str, seconds: float, rate: int, idle: bool) -> None:
    """py-spy on every process of the end-to-end pipeline while it takes ``rate``/s.

    Prints each process's samples by layer, then (without ``--idle``) one table for the
    whole order: each process's CPU from ``/proc`` (user + system, what the kernel
    charged it) shared out over the layers of its samples that were not waiting, plus
    Redis's own CPU. A sample is waiting when its innermost frame blocks (a socket
    read, a poll, a lock or condition wait, BLMOVE): py-spy counts a thread blocked in
    a read as running, and these are not CPU. A system call that works (a send, a file
    write, SQLite's commit) stays with the layer that made it.
    """
    import signal

    from benchmarks.harness import BIN, MODES, Context

    py_spy = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    if py_spy is None:
        raise RuntimeError("py-spy is missing: pip install py-spy")
    work = Path(tempfile.mkdtemp(prefix="bench-spy-"))
    ctx = Context(mode=MODES["quick"], work=work, redis_url=redis_url)
    spies: dict[str, subprocess.Popen[bytes]] = {}
    client = redis.Redis.from_url(redis_url)
    redis_pid = int(client.info("server")["process_id"])
    client.close()
    spent: dict[str, tuple[float, float]] = {}

    def observe(pids: dict[str, int]) -> Any:
        for name, pid in pids.items():
            argv = [py_spy, "record", "--pid", str(pid), "--rate", "200", "--format", "raw"]
            argv += ["--subprocesses"] if name == "orders-api" else []  # gunicorn workers
            argv += ["--idle"] if idle else []
            argv += ["--nonblocking", "--output", str(work / f"spy-{name}.txt")]
            spies[name] = subprocess.Popen(
                argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        trees = {name: process_tree(pid) for name, pid in {**pids, "redis": redis_pid}.items()}
        before = {name: cpu_user_system(tree) for name, tree in trees.items()}

        def finish() -> None:
            for name, tree in trees.items():
                user, system = cpu_user_system(tree)
                spent[name] = (user - before[name][0], system - before[name][1])
            for spy in spies.values():  # py-spy writes its output on SIGINT
                spy.send_signal(signal.SIGINT)
            for spy in spies.values():
                spy.wait(60)

        return finish

    orders = _run_pipeline(ctx, rate, seconds, observe)
    RESULTS_DIR.mkdir(exist_ok=True)
    what = "wall time (on CPU and waiting)" if idle else "CPU"
    order_cpu: dict[str, float] = defaultdict(float)  # layer -> CPU seconds, every process
    for name in spies:
        path = work / f"spy-{name}.txt"
        if not path.exists():
            print(f"\n{name}: no samples")
            order_cpu[NOT_SAMPLED] += sum(spent.get(name, (0.0, 0.0)))
            continue
        totals: dict[str, float] = defaultdict(float)
        working: dict[str, float] = defaultdict(float)
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if stack:
                frames = stack.split(";")
                layer = _layer_of_names(frames)
                totals[layer] += int(count)
                if layer != WAITING and not _waits(frames[-1]):
                    working[layer] += int(count)
        shutil.copy(path, RESULTS_DIR / f"profile-pipeline-{name}.txt")
        busy = sum(totals.values()) / 200
        print_split(
            f"{name}: {what} by layer, {busy:.1f} s sampled, {busy / orders * 1000:.1f} ms"
            " per order",
            {k: v / 200 for k, v in totals.items()},
            orders,
        )
        samples = sum(working.values())
        if name in spent:
            cpu = sum(spent[name])
            for layer, count in working.items():
                order_cpu[layer] += cpu * count / samples
            if not samples:  # its CPU still counts, under no layer
                order_cpu[NOT_SAMPLED] += cpu
    print(f"\ncollapsed stacks: {RESULTS_DIR}/profile-pipeline-*.txt")
    if idle or not spent:
        return
    order_cpu["the Redis server (its own process)"] = sum(spent["redis"])
    kernel = sum(system for _, system in spent.values())
    total = sum(sum(pair) for pair in spent.values())
    print(
        f"\nOne order's CPU, every process ({total / orders * 1000:.2f} ms per order from"
        f" /proc, {kernel / max(total, 1e-9):.0%} of it in the kernel on their behalf),"
        " by layer:\n"
    )
    print("| layer | CPU ms per order | share |")
    print("|---|---:|---:|")
    for layer, cpu in sorted(order_cpu.items(), key=lambda item: -item[1]):
        print(f"| {layer} | {cpu / orders * 1000:.2f} | {cpu / total:.0%} |")


_WAITS = (
    "read_from_socket (",  # redis-py (hiredis) waiting for the reply
    "readinto (socket.py",  # smtplib waiting for the server's reply
    "select (selectors.py",  # event loops, gunicorn's poller
    "poll (selectors.py",
    "Condition.wait (",
    "Event.wait (",
    "Thread.join (",
    "_wait_for_tstate_lock (",
    "_worker (concurrent/futures/thread.py",  # a pool thread waiting for work
    "Queue.get (",
)


def _waits(leaf: str) -> bool:
    """Whether a sample's innermost frame is a thread blocked, not working."""
    return any(name in leaf for name in _WAITS)


WAITING = "waiting in BLMOVE for work (not CPU: py-spy counts it)"
NOT_SAMPLED = "processes py-spy caught only waiting (their CPU, no layer)"


def _layer_of_names(frames: list[str]) -> str:
    if any("blmove" in frame for frame in frames):
        return WAITING
    # py-spy names files relative to sys.path ("Worker._consume (messaging/worker.py:431)"):
    # a leading slash lets the project's "/orders/"-style needles match them too.
    frames = [frame.replace(" (", " (/", 1) for frame in frames]
    for frame in reversed(frames):
        for layer, needles in LAYERS:
            if any(needle in frame for needle in needles):
                return layer
    return "other (stdlib, interpreter)"


def _save(profiler: Profiler, name: str) -> None:
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"profile-{name}.html"
    path.write_text(profiler.output_html())
    print(profiler.output_text(unicode=True, color=False, show_all=False))
    print(f"HTML profile: {path}")


def main(argv: list[str] | None = None) -> int:
    """Run one profile."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profiling")
    parser.add_argument(
        "target",
        choices=["post", "drain", "email", "server", "pipeline", "pipeline-cpu", "cpu", "timeline"],
    )
    parser.add_argument("--seconds", type=float, default=0.0, help="load time (10; pipeline 5)")
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="orders/s (200; pipeline 50; cpu 150, where 0 is as fast as 16 clients go)",
    )
    parser.add_argument("--idle", action="store_true", help="pipeline: sample waiting too")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    server = RedisServer(data_dir=work).start()
    cluster = None
    try:
        if args.target == "drain":
            profile_drain(server.url, args.count or 50_000, args.batch)
        elif args.target == "email":
            profile_email(work, args.count or 2000, args.batch if args.batch != 100 else 10)
        elif args.target == "pipeline":
            profile_pipeline(server.url, args.seconds or 5.0, int(args.rate or 50), args.idle)
        elif args.target == "pipeline-cpu":
            pipeline_cpu(server.url, args.seconds or 5.0, int(args.rate or 50))
        elif args.target == "timeline":
            timeline(server.url, args.seconds or 20.0, int(args.rate or 200))
        else:
            database_url = f"sqlite:///{work / 'orders.db'}"
            if args.database == "postgresql":
                from tests.orders_app import PostgresCluster, find_postgres_bin

                bin_dir = find_postgres_bin()
                if bin_dir is None:
                    print("no PostgreSQL binaries", file=sys.stderr)
                    return 1
                cluster = PostgresCluster(bin_dir).start()
                database_url = cluster.create_database()
            if args.target == "server":
                profile_server(server.url, database_url, args.seconds or 10.0, args.rate or 200.0)
            elif args.target == "cpu":
                postmaster = None
                if cluster is not None:
                    pid_file = cluster.data / "postmaster.pid"
                    postmaster = int(pid_file.read_text().split()[0])
                profile_cpu(
                    server.url,
                    database_url,
                    postmaster,
                    args.seconds or 8.0,
                    150.0 if args.rate is None else args.rate,
                )
            else:
                profile_post(server.url, database_url, args.count or 2000)
    finally:
        if cluster is not None:
            cluster.stop()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
