"""4. End to end: POST to every consumer's effect, at a fixed offered rate.

The whole pipeline runs as ``make up`` runs it, on one SQLite WAL database and the
suite's Redis: orders-api (2 workers, relay threads), ``consumer payment``,
``consumer invoice``, ``consumer shipping``, ``consumer email`` (sending to
``smtp-sink``) and ``orders-updates`` (records the outcome events in the order
history). vegeta offers a fixed rate, open loop (a request starts on schedule whether
or not the earlier ones have answered), for a fixed time, a new Idempotency-Key on
every request.

The observable: each order's ``created_at`` (stamped in the request's transaction)
and, in its history, the timestamps of the outcome events PaymentCaptured,
InvoiceIssued, ShipmentBooked and the "shipped" CustomerNotified, which each consumer
stamps when its effect is committed (the charge, the invoice row, the shipment, the
SMTP send). Latency = outcome timestamp - created_at; "all effects" = the last of
them. After the load, every order must get all of them within the deadline: the rest
are reported as lost.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime
from typing import Any

import redis
from sqlalchemy import func, or_, select

from benchmarks import vegeta
from benchmarks.harness import (
    BIN,
    Context,
    Row,
    cpu_seconds,
    machine_cpu,
    percentile,
    process_tree,
)
from benchmarks.intake import body_file, start_api
from devtools import databases
from devtools.procs import Proc, Timeout, wait_until
from devtools.redis_server import free_port
from messaging import envelope, keys
from messaging.database import database_engine
from orders.bootstrap import create_schema
from orders.models import Order, OrderHistory

SECTION = "4"
SHIPPED_EMAIL = "CustomerNotified:shipped"
EFFECTS = (
    envelope.PAYMENT_CAPTURED,
    envelope.INVOICE_ISSUED,
    envelope.SHIPMENT_BOOKED,
    SHIPPED_EMAIL,
)
CONSUMERS = ("payment", "invoice", "shipping", "email", "updates")
WORKERS = 16
"""Initial vegeta workers (it adds more when requests outlast the schedule)."""


Observer = Callable[[dict[str, int]], Callable[[], None]]
"""Called with each process's name and pid just before the load; what it returns is
called once every effect is in (benchmarks/profiling.py attaches py-spy this way)."""


def one_run(
    ctx: Context,
    *,
    rate: int | None = None,
    seconds: float | None = None,
    observe: Observer | None = None,
) -> dict[str, list[float] | float]:
    """Start the pipeline, offer the load, wait for every effect; latencies in ms.

    ``rate`` and ``seconds`` default to the mode's e2e figures.
    """
    mode = ctx.mode
    rate = rate or mode.e2e_rate
    seconds = seconds or mode.e2e_seconds
    work = ctx.scratch("e2e")
    urls = databases.sqlite_urls(work / "db")  # each service its own, as `make up`
    database_url = urls["orders"]
    engine = database_engine(database_url)
    create_schema(engine)
    client = redis.Redis.from_url(ctx.redis_url)
    client.flushdb()
    smtp_port = free_port()
    env = {
        "REDIS_URL": ctx.redis_url,
        **databases.environment(urls),
        "PATTERN": "both",
        "LOG_LEVEL": "WARNING",
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(smtp_port),
        "SMTP_SINK_DIR": str(work / "mail"),
    }
    procs = [Proc([str(BIN / "smtp-sink")], env, work / "smtp-sink.log")]
    procs += [
        Proc(databases.worker_command(BIN, name), env, work / f"consumer-{name}.log")
        for name in CONSUMERS
    ]
    api = None
    try:
        queues = [*keys.CONSUMER_QUEUES, keys.ORDER_UPDATES_QUEUE]

        def ready() -> bool:
            for proc in procs:
                proc.check_alive()
            return all(client.scard(keys.workers(q)) for q in queues)

        wait_until(ready, 60, 0.05, "the consumers to register")
        api, base = start_api(ctx, database_url)
        finish = None
        if observe is not None:
            pids = {name: proc.popen.pid for name, proc in zip(CONSUMERS, procs[1:], strict=True)}
            finish = observe({"smtp-sink": procs[0].popen.pid, "orders-api": api.popen.pid, **pids})
        pipeline = [
            *process_tree(api.popen.pid),
            int(client.info("server")["process_id"]),
            *(proc.popen.pid for proc in procs),
        ]
        meter = CpuMeter(pipeline)
        sink = [procs[0].popen.pid]  # the stand-in mail server: its file system's cost
        sink_before = cpu_seconds(sink)
        load = vegeta.post(
            f"{base}/orders", body_file(ctx), seconds=seconds, clients=WORKERS, rate=rate
        )
        meter.load_done()
        ctx.log(f"e2e: {load.ok} orders accepted in {load.seconds:.1f}s, waiting for effects")

        def all_done() -> bool:
            for proc in procs:
                proc.check_alive()
            return _complete(engine) >= load.ok

        try:
            # Polled twice a second with one COUNT: the bench's own reads must not
            # compete with the pipeline for the CPU or the orders database.
            wait_until(all_done, mode.e2e_deadline, 0.5, "every order's effects")
        except Timeout:
            ctx.log(f"e2e: deadline reached with {_complete(engine)} of {load.ok} done")
        cpu = meter.stop()
        cpu["cpu_sink"] = cpu_seconds(sink) - sink_before
        if finish is not None:
            finish()
        dead = sum(int(client.llen(keys.dead(q))) for q in queues)
    finally:
        if api is not None:
            api.terminate(15.0)
        for proc in procs:
            proc.terminate(15.0)
        client.close()
    result = _latencies(engine)
    engine.dispose()
    result["offered"] = float(rate)
    result["accepted_rate"] = load.ok / load.seconds if load.seconds else 0.0
    result["post_ms"] = load.latencies_ms
    result["dead_letters"] = float(dead)
    result["accepted"] = float(load.ok)
    result.update(cpu)
    return result


class CpuMeter:
    """CPU from ``/proc`` while the pipeline works: its own processes' (Redis included),
    the load generator's, and what everything else on the machine took meanwhile.

    On a shared machine the same code at the same offered rate finished its last email
    6 s after the POST in one run and 13 s in the next; what other work took from the
    cores is what tells such runs apart, so it is printed beside the figures.
    """

    def __init__(self, pipeline: list[int]) -> None:
        self.pipeline = pipeline
        self.began = time.monotonic()
        self.used = cpu_seconds(pipeline)
        self.busy, self.steal = machine_cpu()
        self.own = time.process_time()
        self.children = _children_cpu()
        self.generator = 0.0

    def load_done(self) -> None:
        """The load generator exited (and was waited for): its CPU is known now."""
        self.generator = _children_cpu() - self.children

    def stop(self) -> dict[str, float]:
        """Seconds of CPU since the start: pipeline, generator, others, steal, and wall."""
        used = cpu_seconds(self.pipeline) - self.used
        busy, steal = machine_cpu()
        own = time.process_time() - self.own
        others = (busy - self.busy) - used - self.generator - own
        return {
            "cpu_pipeline": used,
            "cpu_generator": self.generator,
            "cpu_others": max(others, 0.0),
            "cpu_steal": steal - self.steal,
            "cpu_wall": time.monotonic() - self.began,
        }


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _effects(engine: Any) -> dict[int, dict[str, datetime]]:
    """Order id -> effect kind (EFFECTS) -> when it happened, from the order history."""
    from sqlalchemy.orm import Session

    seen: dict[int, dict[str, datetime]] = defaultdict(dict)
    with Session(engine) as session:
        for order_id, kind, at, data in session.execute(
            select(
                OrderHistory.order_id,
                OrderHistory.type,
                OrderHistory.occurred_at,
                OrderHistory.data,
            )
        ):
            if kind == envelope.CUSTOMER_NOTIFIED:
                kind = f"{kind}:{json.loads(data).get('step')}"
            seen[order_id][kind] = at
    return seen


def _complete(engine: Any) -> int:
    """Orders that have every effect recorded (one aggregate query, no rows fetched)."""
    kinds = [k for k in EFFECTS if k != SHIPPED_EMAIL]
    # history data is stored with sort_keys and no spaces (orders.history.record_event)
    shipped = (OrderHistory.type == envelope.CUSTOMER_NOTIFIED) & OrderHistory.data.contains(
        '"step":"shipped"'
    )
    per_order = (
        select(OrderHistory.order_id)
        .where(or_(OrderHistory.type.in_(kinds), shipped))
        .group_by(OrderHistory.order_id)
        .having(func.count(func.distinct(OrderHistory.type)) == len(kinds) + 1)
        .subquery()
    )
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(per_order)).scalar_one())


def _latencies(engine: Any) -> dict[str, list[float] | float]:
    """ms from each order's created_at to each effect; lost = orders missing one."""
    from sqlalchemy.orm import Session

    with Session(engine) as session:
        created: dict[int, datetime] = dict(
            session.execute(select(Order.id, Order.created_at)).all()
        )
    seen = _effects(engine)
    out: dict[str, list[float] | float] = {kind: [] for kind in EFFECTS}
    out["all"] = []
    # Each complete order's POST and last effect (epoch seconds, aligned): the
    # profiling timeline's "when" (benchmarks/profiling.py).
    placed_at: list[float] = []
    done_at: list[float] = []
    lost = 0
    for order_id, start in created.items():
        effects = seen.get(order_id, {})
        if any(kind not in effects for kind in EFFECTS):
            lost += 1
            continue
        ms = {kind: (effects[kind] - start).total_seconds() * 1000 for kind in EFFECTS}
        for kind, value in ms.items():
            out[kind].append(value)
        out["all"].append(max(ms.values()))
        placed_at.append(start.timestamp())
        done_at.append(max(effects[kind] for kind in EFFECTS).timestamp())
    out["placed_at"] = placed_at
    out["done_at"] = done_at
    out["lost"] = float(lost)
    out["orders"] = float(len(created))
    return out


def run(ctx: Context) -> list[Row]:
    """Latency rows (median over runs of each run's percentile) and the loss count."""
    mode = ctx.mode
    vegeta.ensure_vegeta()
    runs = []
    for i in range(mode.e2e_repeats):
        ctx.log(f"e2e: run {i + 1}, {mode.e2e_rate} orders/s offered for {mode.e2e_seconds:g}s")
        runs.append(one_run(ctx))
    label = f"{mode.e2e_rate}/s for {mode.e2e_seconds:g}s"
    rows = [
        Row(
            SECTION,
            f"orders accepted, {label} offered",
            "orders/s",
            [r["accepted_rate"] for r in runs],
            "offered rate",
            [float(mode.e2e_rate)] * len(runs),
        ),
    ]
    for q in (50, 95, 99, 100):
        stat = "max" if q == 100 else f"p{q}"
        rows.append(
            Row(
                SECTION,
                f"POST to all {len(EFFECTS)} effects done, {stat}",
                "ms",
                [percentile(r["all"], q) for r in runs],
                f"POST response {stat}",
                [percentile(r["post_ms"], q) for r in runs],
            )
        )
    for kind in EFFECTS:
        for q in (50, 99):
            rows.append(
                Row(SECTION, f"POST to {kind}, p{q}", "ms", [percentile(r[kind], q) for r in runs])
            )
    cores = os.cpu_count() or 1
    rows.append(
        Row(
            SECTION,
            "pipeline CPU per order (its processes and Redis, /proc, load to last effect)",
            "ms",
            [r["cpu_pipeline"] / max(r["accepted"], 1.0) * 1000 for r in runs],
            "the machine's CPU per order offered (cores / rate)",
            [cores / mode.e2e_rate * 1000] * len(runs),
            # smtp-sink writes one file per email: on some ext4 directories a file costs
            # 20 times the CPU it costs on others (benchmarks.fs_create); this shows it.
            note=", ".join(
                f"run {i + 1}: smtp-sink {r['cpu_sink'] / max(r['accepted'], 1.0) * 1000:.2f}"
                " ms of it"
                for i, r in enumerate(runs)
            ),
        )
    )
    rows.append(
        Row(
            SECTION,
            "CPU taken by other work meanwhile (not the pipeline, not vegeta)",
            "% of a core",
            [r["cpu_others"] / r["cpu_wall"] * 100 for r in runs],
            note=", ".join(
                f"run {i + 1}: vegeta {r['cpu_generator'] / r['cpu_wall']:.0%} of a core,"
                f" steal {r['cpu_steal'] / r['cpu_wall']:.0%}"
                for i, r in enumerate(runs)
            ),
        )
    )
    dead = [int(r["dead_letters"]) for r in runs]
    if any(dead):
        # Every order here is valid: a dead letter is a refused effect, not a figure.
        raise RuntimeError(f"dead letters after the e2e runs: {dead} (see the consumers' logs)")
    lost_note = ", ".join(
        f"run {i + 1}: {int(r['lost'])} of {int(r['orders'])} orders incomplete,"
        f" {int(r['dead_letters'])} dead letters"
        for i, r in enumerate(runs)
    )
    rows.append(
        Row(
            SECTION,
            "orders missing an effect at the deadline (lost)",
            "orders",
            [r["lost"] for r in runs],
            note=lost_note,
        )
    )
    return rows
