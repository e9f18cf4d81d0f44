"""7. Intake with 200 open dashboard streams: POST /orders latency beside the same without.

Twenty event streams once took every orders-api thread and stopped intake; the streams
now live on ``orders-stream`` (one asyncio loop). This section runs orders-api (SQLite
WAL, as section 3) and orders-stream side by side and measures POST /orders with vegeta,
alternating runs without streams (the limit, same run) and with 200 streams held open
from 200 loopback addresses, each read as a browser would (every OrderPlaced reaches
all 200). A ratio near 1 means the streams cost intake nothing but the CPU their
fan-out takes on the same two cores.
"""

from __future__ import annotations

from benchmarks import vegeta
from benchmarks.harness import BIN, Context, Row, wait_http_ok
from benchmarks.intake import body_file, start_api
from devtools.procs import Proc, wait_until
from devtools.redis_server import free_port
from devtools.streams import StreamCrowd, grant_ticket

SECTION = "7"
STREAMS = 200


def run(ctx: Context) -> list[Row]:
    """Alternate: no streams, 200 streams; ``http_repeats`` times each."""
    mode = ctx.mode
    body = body_file(ctx)
    vegeta.ensure_vegeta()
    database_url = f"sqlite:///{ctx.scratch('streams') / 'orders.db'}"
    api, base = start_api(ctx, database_url)
    port = free_port()
    stream = Proc(
        [str(BIN / "orders-stream")],
        {"HOST": "127.0.0.1", "STREAM_PORT": str(port), "REDIS_URL": ctx.redis_url,
         "LOG_LEVEL": "WARNING"},
        ctx.scratch("stream") / "stream.log",
    )  # fmt: skip
    url = f"{base}/orders"
    without: list[vegeta.Load] = []
    with_streams: list[vegeta.Load] = []
    delivered = 0
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/healthz", stream)
        vegeta.post(url, body, requests=100, clients=4)  # warm-up
        for _ in range(mode.http_repeats):
            without.append(
                vegeta.post(url, body, seconds=mode.http_seconds, clients=mode.http_clients)
            )
            with StreamCrowd(port, STREAMS, grant_ticket(ctx.redis_url)) as crowd:
                wait_until(lambda: crowd.live == STREAMS, 30, 0.05, f"{STREAMS} streams open")
                with_streams.append(
                    vegeta.post(url, body, seconds=mode.http_seconds, clients=mode.http_clients)
                )
                if crowd.live != STREAMS:
                    raise RuntimeError(f"only {crowd.live}/{STREAMS} streams stayed open")
                delivered += crowd.events
        api.check_alive()
        stream.check_alive()
    finally:
        api.terminate(15.0)
        stream.terminate(15.0)
    ctx.log(f"streams: {delivered} events delivered to {STREAMS} streams during the timed runs")
    errors = sum(x.errors for x in with_streams + without)
    note = f"{STREAMS} streams on orders-stream, {mode.http_clients} vegeta workers"
    if errors:
        note += f"; {errors} non-201 answers"
    rows = [
        Row(
            SECTION,
            f"POST /orders with {STREAMS} open streams",
            "orders/s",
            [x.rate for x in with_streams],
            "same, no streams",
            [x.rate for x in without],
            note,
        )
    ]
    for q in (50, 99):
        rows.append(
            Row(
                SECTION,
                f"POST /orders with {STREAMS} open streams, latency p{q}",
                "ms",
                [x.p(q) for x in with_streams],
                f"same, no streams, p{q}",
                [x.p(q) for x in without],
            )
        )
    return rows
