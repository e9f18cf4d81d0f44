"""The README's PATTERN table for orders, as an experiment in each mode, on real processes.

Each test runs the whole order pipeline (Redis, orders-api with its relay, orders-stream,
payment, invoice, shipping, email, orders-updates, smtp-sink) with one PATTERN, and does
what the table says a learner should try: stop the payment consumer (SIGTERM), place
orders, start it again. Then it checks the table's row:

- ``pubsub``: the consumers read the channel, at most once. The orders placed while
  payment was stopped stay ``placed`` for good (no charge, nothing kept on its queue),
  even after an order placed later completes and after the relay's automatic
  reconciliation has seen them (with pubsub it counts, never re-publishes: the
  experiment must not lie); the dashboard's ``/api/orders/stuck`` and ``orders-admin
  stuck`` list them, waiting for payment. The operator's repair, ``orders-relay
  --reconcile``, then completes them, each effect once.
- ``queue``: they wait in the payment queue and complete once it is back; the live
  channel (what the dashboard and ``orders-admin watch`` show) is not silent: it carries
  each order placed and each outcome the order service recorded.
- ``both``: nothing lost either, and the channel carries every event as it is emitted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from sqlalchemy import select
from sqlalchemy.orm import Session

from chaos import stack as chaos_stack
from chaos.stack import Slot
from consumers import store
from devtools.redis_server import RedisServer
from messaging import envelope, keys
from orders import lifecycle
from orders.models import Order
from tests.helpers import wait_for

pytestmark = pytest.mark.e2e

MISSED = 3
"""Orders placed while the payment consumer is stopped."""
SETTLE = 120.0
"""Generous deadline for an order to complete on a loaded machine (seconds)."""
SUBSCRIBERS = 6
"""Channel subscribers with PATTERN=pubsub: five workers and orders-stream."""


class Feed:
    """A subscriber to the order channel, as ``orders-admin watch`` and the dashboard are."""

    def __init__(self, url: str) -> None:
        self.client = redis_lib.Redis.from_url(url)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(keys.ORDER_EVENTS_CHANNEL)
        self.events: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self.pubsub.get_message(timeout=0.5)
            if message and message["type"] == "message":
                self.events.append(json.loads(message["data"]))

    def seen(self, event_type: str, order_ids: set[int]) -> set[int]:
        """The orders among ``order_ids`` with an event of this type on the channel."""
        return {
            e["data"]["order_id"]
            for e in list(self.events)
            if e.get("type") == event_type and e["data"].get("order_id") in order_ids
        }

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.pubsub.close()
        self.client.close()


@pytest.fixture
def run_stack(
    tmp_path: Path, redis_server_factory: Callable[..., RedisServer]
) -> Iterator[Callable[..., chaos_stack.Stack]]:
    """Start the pipeline with a PATTERN; stopped after the test."""
    started: list[chaos_stack.Stack] = []

    def start(pattern: str, **api_env: str) -> chaos_stack.Stack:
        running = chaos_stack.Stack(
            tmp_path / pattern,
            redis=redis_server_factory(),
            workers_per_queue=1,
            proxy=False,
            common_env={"PATTERN": pattern, "REDIS_CONNECT_ATTEMPTS": "100", "LOG_LEVEL": "INFO"},
            api_env={"RATE_LIMIT_PER_MINUTE": "0", **api_env},
            tuning={"CONSUMER_HEARTBEAT_TTL": "3"},
        )
        started.append(running)
        running.start()
        return running

    yield start
    for running in started:
        running.stop()


def _place(stack: chaos_stack.Stack, prefix: str, count: int) -> list[int]:
    body = {
        "customer_email": "ada@example.com",
        "currency": "EUR",
        "items": [{"sku": "BOOK-1", "quantity": 1, "unit_price": "12.50"}],
    }
    return [
        chaos_stack.post_order(stack.base + "/orders", body, f"{prefix}-{n}") for n in range(count)
    ]


def _status(stack: chaos_stack.Stack, order_ids: list[int]) -> dict[int, str]:
    with Session(stack.engine) as session:
        rows = session.execute(select(Order.id, Order.status).where(Order.id.in_(order_ids)))
        return dict(rows.all())  # type: ignore[arg-type]


def _charged(stack: chaos_stack.Stack, order_ids: list[int]) -> set[int]:
    with Session(stack.engines["payment"]) as session:
        found = session.scalars(
            select(store.GatewayCharge.order_id).where(store.GatewayCharge.order_id.in_(order_ids))
        )
        return set(found.all())


def _settled(stack: chaos_stack.Stack, order_ids: list[int]) -> Callable[[], bool]:
    return lambda: stack.completed(order_ids) == set(order_ids)


def _payment(stack: chaos_stack.Stack) -> Slot:
    return next(slot for slot in stack.slots if slot.name == "payment")


def _numsub(stack: chaos_stack.Stack) -> int:
    assert stack.client is not None
    return int(
        dict(stack.client.pubsub_numsub(keys.ORDER_EVENTS_CHANNEL))[
            keys.ORDER_EVENTS_CHANNEL.encode()
        ]
    )


def _stop_payment(stack: chaos_stack.Stack) -> None:
    slot = _payment(stack)
    assert slot.proc is not None
    assert slot.proc.terminate(30.0) == 0, slot.proc.output()[-2000:]


def _start_payment(stack: chaos_stack.Stack, pattern: str) -> None:
    stack.start_slot(_payment(stack))
    assert stack.client is not None
    wait_for(
        lambda: stack.client.scard(keys.workers(keys.PAYMENT_QUEUE)) >= 1,
        60,
        0.1,  # type: ignore[union-attr]
        "the payment worker registered again",
    )
    if pattern == "pubsub":
        wait_for(lambda: _numsub(stack) >= SUBSCRIBERS, 60, 0.1, "payment subscribed again")


def _stuck(stack: chaos_stack.Stack, older_than: float) -> list[dict[str, Any]]:
    request = urllib.request.Request(
        f"{stack.base}/api/orders/stuck?older_than={older_than:g}",
        headers={"Authorization": f"Bearer {stack.admin_token}", "Accept": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 (loopback)
        return list(json.load(response)["orders"])


def _admin_stuck(stack: chaos_stack.Stack, older_than: float) -> str:
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "orders-admin"),
            "stuck",
            "--older-than",
            f"{older_than:g}",
        ],
        env={**os.environ, **stack.common},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _experiment(stack: chaos_stack.Stack, pattern: str, feed: Feed) -> tuple[list[int], list[int]]:
    """Warm-up order completes; stop payment; place MISSED orders; start payment again.

    Returns (the orders placed while payment was stopped, an order placed after).
    """
    if pattern == "pubsub":
        wait_for(lambda: _numsub(stack) >= SUBSCRIBERS, 60, 0.1, "every worker subscribed")
    warm = _place(stack, f"{pattern}-warm", 1)
    wait_for(_settled(stack, warm), SETTLE, 0.2, f"the first order completed ({pattern})")

    _stop_payment(stack)
    missed = _place(stack, f"{pattern}-away", MISSED)
    # The rest of the pipeline still works on them: the email service confirms receipt.
    wait_for(
        lambda: feed.seen(envelope.CUSTOMER_NOTIFIED, set(missed)) == set(missed),
        SETTLE,
        0.2,
        "the 'received' emails of the orders placed while payment was stopped",
    )
    assert stack.client is not None
    kept = int(stack.client.llen(keys.pending(keys.PAYMENT_QUEUE)))
    assert kept == (0 if pattern == "pubsub" else MISSED), kept
    _start_payment(stack, pattern)
    after = _place(stack, f"{pattern}-after", 1)
    return missed, after


def test_pubsub_a_stopped_consumer_loses_the_orders_placed_meanwhile(
    run_stack: Callable[..., chaos_stack.Stack],
) -> None:
    # Automatic reconciliation as eager as it gets: with pubsub it must only count.
    stack = run_stack("pubsub", RECONCILE_INTERVAL_SECONDS="0.5", RECONCILE_AFTER_SECONDS="1")
    feed = Feed(stack.redis.url)
    try:
        missed, after = _experiment(stack, "pubsub", feed)
        wait_for(_settled(stack, after), SETTLE, 0.2, "the order placed after the restart")
        # Payment is back and works; what it missed is gone: no charge, nothing kept.
        assert _status(stack, missed) == dict.fromkeys(missed, lifecycle.PLACED)
        assert not _charged(stack, missed)
        assert stack.client is not None
        assert stack.client.llen(keys.pending(keys.PAYMENT_QUEUE)) == 0
        assert stack.dead_letters() == 0
        # The operator sees them as stuck, waiting for payment: dashboard and CLI.
        # Each becomes stuck one second after its own placement: wait for all of them
        # (on a loaded machine the first two were listed before the third).
        stuck = wait_for(
            lambda: (
                (listed := [o for o in _stuck(stack, 1) if o["id"] in missed])
                and {o["id"] for o in listed} == set(missed)
                and listed
            ),
            30,
            0.5,
            "the missed orders listed as stuck",
        )
        assert sorted(o["id"] for o in stuck) == sorted(missed)
        assert {(o["status"], o["waiting_for"]) for o in stuck} == {("placed", "payment")}
        assert after[0] not in {o["id"] for o in _stuck(stack, 0)}
        listing = _admin_stuck(stack, 1)
        for order_id in missed:
            row = next(line for line in listing.splitlines() if line.startswith(f"#{order_id} "))
            assert row.split()[1] == "placed" and row.endswith("payment"), listing
        # And they stay so: the relay's reconciliation saw them stuck and left them.
        assert stack.api is not None
        wait_for(
            lambda: "PATTERN=pubsub: not re-published" in stack.api.output(),
            60,
            0.2,
            "a reconciliation pass that found them",
        )
        assert _status(stack, missed) == dict.fromkeys(missed, lifecycle.PLACED)
        assert not _charged(stack, missed)
        # The README's repair by hand: re-publish their stored OrderPlaced; the listening
        # consumers do the missed work, once.
        repair = subprocess.run(
            [str(Path(sys.executable).parent / "orders-relay"), "--reconcile", "--older-than", "0"],
            env={**os.environ, **stack.common}, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert repair.returncode == 0, repair.stdout + repair.stderr
        wait_for(_settled(stack, missed), SETTLE, 0.2, "the repaired orders completed")
        everything = [*missed, *after]
        effects = stack.effects(min(everything), max(everything))
        assert {k: v for k, v in effects.items() if k != "orders"} == dict.fromkeys(
            ("charges", "invoices", "shipments", "emails", "outcomes", "declined_fulfilled"), 0
        )
    finally:
        feed.close()


@pytest.mark.parametrize("pattern", ["queue", "both"])
def test_queue_and_both_a_stopped_consumer_loses_nothing(
    run_stack: Callable[..., chaos_stack.Stack], pattern: str
) -> None:
    stack = run_stack(pattern)
    feed = Feed(stack.redis.url)
    try:
        missed, after = _experiment(stack, pattern, feed)
        everything = missed + after
        wait_for(_settled(stack, everything), SETTLE, 0.2, "every order completed")
        assert _charged(stack, everything) == set(everything)
        effects = stack.effects(min(everything), max(everything))
        assert effects == {
            "orders": len(everything),
            "charges": 0,
            "invoices": 0,
            "shipments": 0,
            "emails": 0,
            "outcomes": 0,
            "declined_fulfilled": 0,
        }
        # The live channel is not silent: every order placed, and its recorded outcomes.
        wanted = set(everything)
        for event_type in (
            envelope.ORDER_PLACED,
            envelope.PAYMENT_CAPTURED,
            envelope.INVOICE_ISSUED,
            envelope.SHIPMENT_BOOKED,
        ):
            wait_for(
                lambda t=event_type: feed.seen(t, wanted) == wanted,
                30,
                0.2,  # type: ignore[misc]
                f"{event_type} of every order on {keys.ORDER_EVENTS_CHANNEL}",
            )
        senders = {e["sender"] for e in feed.events if e["type"] == envelope.PAYMENT_CAPTURED}
        assert senders == {"payment-service"}
        # Once per recorded event: the feed shows what the service records, not more.
        ids = [e["id"] for e in feed.events if e["data"].get("order_id") in wanted]
        assert len(ids) == len(set(ids)), "an event shown twice on the feed"
        assert not [o for o in _stuck(stack, 0) if o["id"] in wanted]
    finally:
        feed.close()
