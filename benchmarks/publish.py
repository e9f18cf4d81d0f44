"""2. Publish: OrderPlaced events/s through the real publisher and the outbox relay.

Every event goes where PATTERN=both sends it: PUBLISH on the order channel and RPUSH to
the queues OrderPlaced is routed to (payment, email), in one Lua call per event (atomic
per event).

- ``EventPublisher.publish``: one event per call (what a request does after commit);
- ``EventPublisher.publish_serialized``: pipelines of 100 (what the relay sends);
- the outbox relay's ``run_once`` in batches of 100: claim rows (UPDATE ... RETURNING),
  publish them, mark them published, on SQLite WAL (and PostgreSQL when available).

Limit, same run: the same writes (PUBLISH + 2 RPUSH per event) sent raw, pipelined 100
events at a time, no Lua, no atomicity.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from typing import Any

import redis
from sqlalchemy import insert

from benchmarks.drain import job
from benchmarks.harness import Context, Row, repeat
from messaging import envelope, keys
from messaging.database import database_engine
from messaging.publisher import EventPublisher
from orders.bootstrap import create_schema
from orders.models import Outbox, utc_now
from orders.outbox import Relay

SECTION = "2"
BATCH = 100


def _load(raw: bytes) -> dict[str, Any]:
    return dict(json.loads(raw))


def _client(ctx: Context) -> redis.Redis:
    client = redis.Redis.from_url(ctx.redis_url, decode_responses=True)
    client.flushdb()
    return client


def _timed(action: Callable[[], None]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def _check(client: redis.Redis, count: int) -> None:
    for queue in envelope.queues_for(envelope.ORDER_PLACED):
        got = client.llen(keys.pending(queue))
        if got != count:
            raise RuntimeError(f"queue {queue} holds {got} events, expected {count}")


def raw_pipelined(ctx: Context, payloads: list[str]) -> float:
    """PUBLISH + one RPUSH per queue of the event, pipelines of 100 events, no Lua."""
    client = _client(ctx)
    queues = [keys.pending(q) for q in envelope.queues_for(envelope.ORDER_PLACED)]

    def send() -> None:
        for i in range(0, len(payloads), BATCH):
            pipe = client.pipeline(transaction=False)
            for payload in payloads[i : i + BATCH]:
                pipe.publish(keys.ORDER_EVENTS_CHANNEL, payload)
                for queue in queues:
                    pipe.rpush(queue, payload)
            pipe.execute()

    seconds = _timed(send)
    _check(client, len(payloads))
    client.close()
    return seconds


def publisher_single(ctx: Context, batch: list[dict[str, Any]]) -> float:
    """EventPublisher.publish for each event (serialization included)."""
    client = _client(ctx)
    publisher = EventPublisher(client, "both")

    def send() -> None:
        for event in batch:
            publisher.publish(event)

    seconds = _timed(send)
    _check(client, len(batch))
    client.close()
    return seconds


def publisher_pipelined(ctx: Context, payloads: list[str]) -> float:
    """EventPublisher.publish_serialized, 100 events per pipeline."""
    client = _client(ctx)
    publisher = EventPublisher(client, "both")

    def send() -> None:
        for i in range(0, len(payloads), BATCH):
            publisher.publish_serialized(
                (envelope.ORDER_PLACED, payload) for payload in payloads[i : i + BATCH]
            )

    seconds = _timed(send)
    _check(client, len(payloads))
    client.close()
    return seconds


def relay(ctx: Context, database_url: str, payloads: list[str]) -> float:
    """Fill the outbox with unpublished rows, then time Relay.run_once until it is empty."""
    client = _client(ctx)
    engine = database_engine(database_url)
    create_schema(engine)
    now = utc_now()
    with engine.begin() as conn:
        conn.execute(
            insert(Outbox),
            [
                {
                    "event_id": f"bench-{i}",
                    "type": envelope.ORDER_PLACED,
                    "payload": payload,
                    "created_at": now,
                    "attempts": 0,
                }
                for i, payload in enumerate(payloads)
            ],
        )
    worker = Relay(engine, EventPublisher(client, "both"), batch=BATCH)

    def drain() -> None:
        while worker.run_once():
            pass

    seconds = _timed(drain)
    _check(client, len(payloads))
    engine.dispose()
    client.close()
    return seconds


def run(ctx: Context) -> list[Row]:
    """The publisher rows, each beside the raw pipelined limit."""
    mode = ctx.mode
    n = mode.publish_events
    batch = [_load(job(i)) for i in range(1, n + 1)]
    payloads = [envelope.dumps(event) for event in batch]

    def rate(seconds: list[float]) -> list[float]:
        return [n / s for s in seconds]

    ctx.log(f"publish: {n} events per run")
    limit = rate(repeat(mode.repeats, functools.partial(raw_pipelined, ctx, payloads)))
    limit_name = "raw pipelined PUBLISH + 2 RPUSH, 100 events/pipeline"
    rows = [
        Row(
            SECTION,
            "EventPublisher.publish, 1 event per call (Lua: channel + 2 queues)",
            "events/s",
            rate(repeat(mode.repeats, functools.partial(publisher_single, ctx, batch))),
            limit_name,
            limit,
        ),
        Row(
            SECTION,
            "EventPublisher.publish_serialized, 100 events per pipeline",
            "events/s",
            rate(repeat(mode.repeats, functools.partial(publisher_pipelined, ctx, payloads))),
            limit_name,
            limit,
        ),
    ]
    databases = {"SQLite WAL": lambda: f"sqlite:///{ctx.scratch('relay') / 'orders.db'}"}
    databases["PostgreSQL"] = ctx.postgres_url
    for label, make_url in databases.items():
        values: list[float] = []
        for _ in range(mode.repeats):
            url = make_url()
            if url is None:
                break
            values.append(relay(ctx, url, payloads))
        if not values:
            ctx.log(f"publish: relay on {label} skipped: {ctx.postgres_skipped}")
            continue
        rows.append(
            Row(
                SECTION,
                f"outbox relay, batches of {BATCH}, {label} (claim, publish, mark)",
                "events/s",
                rate(values),
                limit_name,
                limit,
            )
        )
    return rows
