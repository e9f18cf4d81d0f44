"""9. Tracing: what trace context and OpenTelemetry cost, off and on, in the same run.

Three settings of the same processes, each measured in turn on the same Redis:

- **disabled** (``OTEL_SDK_DISABLED=true``): OpenTelemetry's no-op tracer, no SDK; an
  envelope carries only a context it was given. The limit: as if there were no tracing.
- **off** (the default: no ``OTEL_EXPORTER_OTLP_ENDPOINT``): a new span id per request
  and per message (non-recording spans, no SDK), so every envelope and log line carries
  a trace id; nothing is built or exported.
- **on** (``OTEL_EXPORTER_OTLP_ENDPOINT`` set): spans are batched and exported over
  OTLP/HTTP to a real receiver in this process (:mod:`devtools.otlp_receiver`).

Figures: ``POST /orders`` per second (orders-api as in section 3, SQLite WAL, vegeta)
and the drain of one ``consumer noop`` process (batch 100, as in section 1) on jobs
that carry a ``traceparent``. The ratio is each setting over *disabled*. The note says
how many spans the receiver got: the exporter's queue drops spans (never messages)
when a burst outruns it.
"""

from __future__ import annotations

import statistics

from benchmarks import drain, intake, vegeta
from benchmarks.harness import BIN, Context, Row, wait_http_ok
from devtools.otlp_receiver import OTLPReceiver
from devtools.procs import Proc
from devtools.redis_server import free_port

SECTION = "9"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
"""The context every drained job carries (a caller's), so consumer spans are children."""


def settings(receiver: OTLPReceiver) -> dict[str, dict[str, str]]:
    """The three settings' environments."""
    return {
        "disabled": {"OTEL_SDK_DISABLED": "true"},
        "off": {},
        "on": {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint},
    }


def traced_job(n: int) -> bytes:
    """Section 1's no-op job, with a traceparent."""
    return drain.job(n).replace(
        b'"version":1,', f'"version":1,"traceparent":"{TRACEPARENT}",'.encode()
    )


def post_rates(ctx: Context, env: dict[str, str], label: str) -> list[vegeta.Load]:
    """orders-api on a fresh SQLite database with ``env`` added: a warm-up, one timed run."""
    port = free_port()
    database_url = f"sqlite:///{ctx.scratch('tracing-' + label) / 'orders.db'}"
    proc = Proc(
        [str(BIN / "orders-api")],
        {**intake.server_env(port, database_url, ctx.redis_url), **env},
        ctx.scratch("tracing-" + label) / "server.log",
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(f"{base}/healthz", proc)
        url, body = f"{base}/orders", intake.body_file(ctx)
        vegeta.post(url, body, requests=100, clients=4)  # warm-up
        loads = [
            vegeta.post(url, body, seconds=ctx.mode.http_seconds, clients=ctx.mode.http_clients)
        ]
        proc.check_alive()
    finally:
        proc.terminate(15.0)
    return loads


def run(ctx: Context) -> list[Row]:
    """Drain and POST rates under each setting."""
    mode = ctx.mode
    vegeta.ensure_vegeta()
    jobs = [traced_job(n) for n in range(1, mode.drain_jobs + 1)]
    rows: list[Row] = []
    with OTLPReceiver() as receiver:
        envs = settings(receiver)
        drains: dict[str, list[float]] = {label: [] for label in envs}
        spans: dict[str, int] = dict.fromkeys(envs, 0)
        # Interleaved (one run of each setting per round): the machine's load drifts
        # between rounds, and each setting then sees the same drift.
        for round_ in range(mode.repeats):
            for label, env in envs.items():
                before = len(receiver.spans())
                ctx.log(f"tracing: consumer noop drain, {label}, round {round_ + 1}")
                times = drain.consumers_drain(
                    ctx, jobs, processes=1, batch=100, repeats=1, extra_env=env
                )
                drains[label] += [len(jobs) / t for t in times]
                spans[label] += len(receiver.spans()) - before
        posts: dict[str, list[vegeta.Load]] = {label: [] for label in envs}
        post_spans: dict[str, int] = dict.fromkeys(envs, 0)
        for round_ in range(mode.http_repeats):
            for label, env in envs.items():
                before = len(receiver.spans())
                ctx.log(f"tracing: POST /orders, {label}, round {round_ + 1}")
                posts[label] += post_rates(ctx, env, f"{label}-{round_}")
                post_spans[label] += len(receiver.spans()) - before
    sent = len(jobs) * mode.repeats
    for label in ("off", "on"):
        rows.append(
            Row(
                SECTION,
                f"consumer noop drain, batch 100, tracing {label}",
                "jobs/s",
                drains[label],
                "OTEL_SDK_DISABLED=true",
                drains["disabled"],
                f"{spans[label]} of {sent} spans received"
                if label == "on"
                else f"{spans[label]} spans exported",
            )
        )
    for label in ("off", "on"):
        accepted = sum(load.ok for load in posts[label])
        rows.append(
            Row(
                SECTION,
                f"POST /orders, SQLite WAL, tracing {label}",
                "orders/s",
                [load.rate for load in posts[label]],
                "OTEL_SDK_DISABLED=true",
                [load.rate for load in posts["disabled"]],
                f"{post_spans[label]} spans received for about {accepted} timed POSTs"
                " (+ warm-up, + relay polls)",
            )
        )
    ctx.log(
        "tracing: drain jobs/s "
        + ", ".join(f"{k} {statistics.median(v):.0f}" for k, v in drains.items())
        + "; POST/s "
        + ", ".join(f"{k} {statistics.median(x.rate for x in v):.0f}" for k, v in posts.items())
    )
    return rows
