"""Real ``consumer`` processes on a real Redis: crash recovery, shutdown, exit codes,
duplicates, gap-free invoices, email over real SMTP, reconnecting after a Redis restart."""

from __future__ import annotations

import asyncio
import email
import json
import signal
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from consumers import store
from consumers.config import DATABASE_VARS
from devtools.redis_server import RedisServer, free_port
from messaging import database, envelope, keys
from messaging.queue import RedisQueue
from tests.helpers import BIN, Proc, wait_for

CONSUMER = str(BIN / "consumer")


def order_placed(order_id: int, email_to: str = "ann@example.com") -> dict[str, Any]:
    return envelope.envelope(
        envelope.ORDER_PLACED,
        {
            "order_id": order_id,
            "customer_email": email_to,
            "currency": "EUR",
            "lines": [
                {"sku": "<i>SKU</i>", "quantity": 1, "unit_price": "3.50", "line_total": "3.50"}
            ],
            "total": "3.50",
        },
        message=f"Order #{order_id} placed",
        sender="orders-api",
        count=order_id,
    )


def payment_captured(order_id: int) -> dict[str, Any]:
    return envelope.envelope(
        envelope.PAYMENT_CAPTURED,
        {
            "order_id": order_id,
            "payment_id": f"pay_{order_id}",
            "amount": "3.50",
            "currency": "EUR",
        },
        message=f"Payment captured for order #{order_id}",
        sender="payment-service",
        count=order_id,
    )


class Env:
    """Starts consumer processes against one Redis and one database.

    Each test here exercises one service, so the services share the test's database
    (every ``<NAME>_DATABASE_URL`` names it); the full stack harnesses give each its own.
    """

    def __init__(self, tmp_path: Path, redis_url: str) -> None:
        self.tmp = tmp_path
        self.redis_url = redis_url
        self.db_url = f"sqlite:///{tmp_path / 'consumers.db'}"
        self.procs: list[Proc] = []
        self._engine: Engine | None = None

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "REDIS_URL": self.redis_url,
            **{var: self.db_url for var in DATABASE_VARS.values()},
            "REDIS_CONNECT_ATTEMPTS": "1",
            "CONSUMER_HEARTBEAT_TTL": "2",
            "CONSUMER_BACKOFF_BASE": "0.2",
            **extra,
        }

    def start(self, *argv: str, **extra: str) -> Proc:
        name = f"{argv[0]}-{len(self.procs)}"
        proc = Proc([CONSUMER, *argv], self.env(**extra), self.tmp / f"{name}.log")
        self.procs.append(proc)
        return proc

    def engine(self) -> Engine:
        """One engine per test on the consumers' database (disposed by stop_all)."""
        if self._engine is None:
            self._engine = store.make_engine(self.db_url)
            for service in store.SERVICE_TABLES:
                store.create_tables(self._engine, service)
        return self._engine

    def stop_all(self) -> None:
        for proc in self.procs:
            proc.kill()
        if self._engine is not None:
            self._engine.dispose()


@pytest.fixture
def env(tmp_path: Path, redis: redis_lib.Redis, redis_url: str) -> Iterator[Env]:
    e = Env(tmp_path, redis_url)
    yield e
    e.stop_all()


@pytest.fixture
def bredis(redis: redis_lib.Redis, redis_url: str) -> Iterator[redis_lib.Redis]:
    client = redis_lib.Redis.from_url(redis_url)
    yield client
    client.close()


def rows(engine: Engine, model: Any) -> int:
    with Session(engine) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def updates(client: redis_lib.Redis) -> list[dict[str, Any]]:
    """The outcome events the consumers emitted (the order-updates queue)."""
    return [json.loads(m) for m in client.lrange(keys.pending(keys.ORDER_UPDATES_QUEUE), 0, -1)]


def test_bad_config_exits_2_with_one_line(env: Env) -> None:
    for argv, extra in [
        (("bogus",), {}),
        (("payment", "--concurrency", "0"), {}),
        (("payment",), {"CONSUMER_CONCURRENCY": "many"}),
        (("payment",), {"PATTERN": "sometimes"}),
    ]:
        proc = env.start(*argv, **extra)
        assert proc.popen.wait(15) == 2, proc.output()
        [line] = proc.lines()
        assert line.startswith("consumer: ")
        assert "invalid" in line or "unknown consumer" in line


def test_no_redis_at_start_exits_1(env: Env) -> None:
    proc = Proc(
        [CONSUMER, "payment"],
        {**env.env(), "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"},
        env.tmp / "noredis.log",
    )
    assert proc.popen.wait(30) == 1
    assert "Failed to connect to Redis after 1 attempts. Exiting." in proc.output()


def test_reaper_returns_the_messages_of_a_killed_worker_exactly_once(
    env: Env, bredis: redis_lib.Redis
) -> None:
    queue = RedisQueue(bredis, "payment")
    event = order_placed(1)
    queue.push(envelope.dumps(event))
    slow = env.start("payment", PAYMENT_LATENCY_MS="5000", CONSUMER_BATCH_SIZE="1")
    [worker] = wait_for(
        lambda: [
            w.decode()
            for w in bredis.smembers(keys.workers("payment"))
            if bredis.llen(keys.processing("payment", w.decode()))
        ],
        timeout=20,
        message="the slow worker to hold the message",
    )
    slow.kill()  # SIGKILL mid-charge: no goodbye, the message stays in its processing list
    assert bredis.llen(keys.processing("payment", worker)) == 1
    reaped = wait_for(queue.reap, timeout=10, message="the heartbeat to expire")
    assert reaped == {worker: 1}
    assert [json.loads(m)["id"] for m in bredis.lrange(keys.pending("payment"), 0, -1)] == [
        event["id"]
    ]
    env.start("payment")
    wait_for(lambda: updates(bredis), timeout=20, message="the payment outcome")
    engine = env.engine()
    assert rows(engine, store.Processed) == 1
    assert rows(engine, store.GatewayCharge) == 1
    [captured] = updates(bredis)
    assert captured["type"] == envelope.PAYMENT_CAPTURED
    assert captured["data"]["order_id"] == 1
    # The outcome goes out before the ack (emit, then ack): wait for the ack.
    wait_for(lambda: queue.stats()["processed"] == 1, timeout=10, message="the ack")
    stats = queue.stats()
    assert (stats["processed"], stats["pending"], stats["in_flight"]) == (1, 0, 0)


class HeldSmtp:
    """A real SMTP server (aiosmtpd, as smtp-sink) that holds every DATA until released.

    Why: a shutdown test must signal a worker while it is *inside* a message. A fixed
    handler latency only makes that likely (the signal can land between the take and
    the first message, and then nothing is finished); a mail the server has received
    and not yet answered is a message whose handling has certainly begun.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.arrived = threading.Event()
        self.release = threading.Event()
        self.accepted: list[bytes] = []

    async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:  # noqa: N802
        """Called by aiosmtpd for each message: say it arrived, wait, then answer 250."""
        self.arrived.set()
        released = await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 300)
        if not released:
            return "451 the test never released this message"
        self.accepted.append(envelope.content)
        return "250 Message accepted for delivery"

    def env(self) -> dict[str, str]:
        """The email consumer's settings for this server (a timeout far past any wait)."""
        return {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(self.port), "SMTP_TIMEOUT": "300"}


@pytest.fixture
def held_smtp() -> Iterator[HeldSmtp]:
    from aiosmtpd.controller import Controller

    server = HeldSmtp()
    controller = Controller(server, hostname="127.0.0.1", port=server.port)
    controller.start()
    try:
        yield server
    finally:
        server.release.set()
        controller.stop()


def test_sigterm_finishes_the_current_message_and_puts_the_rest_back(
    env: Env, bredis: redis_lib.Redis, held_smtp: HeldSmtp
) -> None:
    queue = RedisQueue(bredis, "email")
    batch = [order_placed(i) for i in (1, 2, 3)]
    queue.push(*(envelope.dumps(e) for e in batch))
    proc = env.start("email", CONSUMER_BATCH_SIZE="3", **held_smtp.env())
    # The first email is in the server's hands: the worker is inside message 1.
    wait_for(held_smtp.arrived.is_set, timeout=60, interval=0.05, message="the first email")
    assert queue.stats()["in_flight"] == 3
    proc.popen.send_signal(signal.SIGTERM)
    proc.wait_output("received signal 15", timeout=60)
    held_smtp.release.set()
    assert proc.popen.wait(60) == 0, proc.output()
    # The first (started) message was finished and acked; the two others are back, in order.
    assert len(held_smtp.accepted) == 1
    assert [e["data"]["order_id"] for e in updates(bredis)] == [1]
    assert [json.loads(m)["id"] for m in bredis.lrange(keys.pending("email"), 0, -1)] == [
        batch[1]["id"],
        batch[2]["id"],
    ]
    assert queue.stats()["in_flight"] == 0
    assert bredis.scard(keys.workers("email")) == 0


def test_second_signal_exits_at_once(
    env: Env, bredis: redis_lib.Redis, held_smtp: HeldSmtp
) -> None:
    RedisQueue(bredis, "email").push(envelope.dumps(order_placed(1)))
    proc = env.start("email", **held_smtp.env())
    wait_for(held_smtp.arrived.is_set, timeout=60, interval=0.05, message="the email")
    proc.popen.send_signal(signal.SIGTERM)
    proc.wait_output("received signal 15", timeout=60)
    # The first signal waits for the held message; the second does not wait for it.
    proc.popen.send_signal(signal.SIGTERM)
    assert proc.popen.wait(60) == 128 + signal.SIGTERM
    assert held_smtp.accepted == []


def test_duplicate_deliveries_produce_one_effect(env: Env, bredis: redis_lib.Redis) -> None:
    queue = RedisQueue(bredis, "invoice")
    event = payment_captured(42)
    payload = envelope.dumps(event)
    queue.push(payload, payload, payload)  # the outbox relay may send an event twice
    env.start("invoice", CONSUMER_BATCH_SIZE="1")
    env.start("invoice", CONSUMER_BATCH_SIZE="1")
    wait_for(lambda: queue.stats()["processed"] == 3, timeout=20, message="three deliveries")
    engine = env.engine()
    assert rows(engine, store.Invoice) == 1
    emitted = updates(bredis)
    assert len(emitted) == 3  # each delivery (re-)emits ...
    assert len({e["id"] for e in emitted}) == 1  # ... the SAME stored outcome event


def test_shipping_books_once_per_order_and_tells_email_and_the_order_service(
    env: Env, bredis: redis_lib.Redis
) -> None:
    queue = RedisQueue(bredis, keys.SHIPPING_QUEUE)
    first = payment_captured(5)
    # A redelivery, and a second capture of order 5 (another event id).
    queue.push(
        *(envelope.dumps(e) for e in (first, first, payment_captured(5), payment_captured(6)))
    )
    env.start("shipping", "--concurrency", "2", CONSUMER_BATCH_SIZE="1")
    wait_for(lambda: queue.stats()["processed"] == 4, timeout=20, message="four deliveries")
    with Session(env.engine()) as session:
        shipments = session.scalars(select(store.Shipment).order_by(store.Shipment.order_id)).all()
    assert [s.order_id for s in shipments] == [5, 6]
    booked = updates(bredis)
    assert {e["type"] for e in booked} == {envelope.SHIPMENT_BOOKED}
    assert len({e["id"] for e in booked}) == 2  # one event per order, however often told
    to_email = [json.loads(m) for m in bredis.lrange(keys.pending(keys.EMAIL_QUEUE), 0, -1)]
    assert sorted(e["id"] for e in to_email) == sorted(e["id"] for e in booked)
    by_order = {e["data"]["order_id"]: e["data"]["tracking_number"] for e in booked}
    assert by_order == {s.order_id: s.tracking_number for s in shipments}


def test_invoice_numbers_are_gap_free_under_four_concurrent_workers(
    env: Env, bredis: redis_lib.Redis, database_url: str
) -> None:
    """On SQLite (BEGIN IMMEDIATE) and on PostgreSQL (SELECT ... FOR UPDATE)."""
    env.db_url = database_url
    queue = RedisQueue(bredis, "invoice")
    count = 120
    queue.push(*(envelope.dumps(payment_captured(i)) for i in range(1, count + 1)))
    for _ in range(2):  # 2 processes x 2 threads = 4 concurrent workers
        env.start("invoice", "--concurrency", "2", CONSUMER_BATCH_SIZE="2", LOG_LEVEL="WARNING")
    wait_for(lambda: queue.stats()["processed"] == count, timeout=60, message="all invoices")
    with Session(env.engine()) as session:
        numbers = session.scalars(select(store.Invoice.invoice_number)).all()
    year = datetime.now(UTC).year
    assert sorted(numbers) == [f"INV-{year}-{n:06d}" for n in range(1, count + 1)]
    assert len({e["data"]["order_id"] for e in updates(bredis)}) == count


def test_email_goes_over_real_smtp_and_is_retried_while_smtp_is_down(
    env: Env, bredis: redis_lib.Redis
) -> None:
    port = free_port()
    mail_dir = env.tmp / "mail"
    queue = RedisQueue(bredis, "email")
    event = order_placed(7, "bob@example.com")
    queue.push(envelope.dumps(event))
    env.start("email", SMTP_PORT=str(port), SMTP_HOST="127.0.0.1", SMTP_TIMEOUT="2")
    wait_for(
        lambda: queue.stats()["retried"] >= 1, timeout=20, message="a retry while SMTP is down"
    )
    sink = Proc(
        [str(BIN / "smtp-sink")],
        {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(port), "SMTP_SINK_DIR": str(mail_dir)},
        env.tmp / "sink.log",
    )
    env.procs.append(sink)
    wait_for(lambda: updates(bredis), timeout=30, message="the email sent")
    [eml] = list(mail_dir.glob("*.eml"))
    msg = email.message_from_bytes(eml.read_bytes(), policy=default_policy)
    assert msg["Message-ID"] == "<order-7.received@example.com>"
    assert msg["To"] == "bob@example.com"
    assert msg["Subject"] == "We received your order #7"
    html = msg.get_body(("html",))
    assert html is not None and "&lt;i&gt;SKU&lt;/i&gt;" in html.get_content()
    [sent] = updates(bredis)
    assert sent["type"] == envelope.CUSTOMER_NOTIFIED
    assert sent["data"] == {"order_id": 7, "step": "received", "message_id": msg["Message-ID"]}
    assert rows(env.engine(), store.EmailSent) == 1
    sink.wait_output("smtp-sink: stored")


def test_worker_survives_a_redis_restart(
    tmp_path: Path, redis_server_factory: Callable[..., RedisServer]
) -> None:
    server = redis_server_factory(appendonly=True, appendfsync="always")
    client = redis_lib.Redis.from_url(server.url)
    queue = RedisQueue(client, "invoice")
    env = Env(tmp_path, server.url)
    try:
        proc = env.start("invoice")
        queue.push(envelope.dumps(payment_captured(1)))
        wait_for(lambda: queue.stats()["processed"] == 1, timeout=20, message="first invoice")
        server.restart()
        queue.push(envelope.dumps(payment_captured(2)))
        wait_for(lambda: queue.stats()["processed"] == 2, timeout=30, message="second invoice")
        assert rows(env.engine(), store.Invoice) == 2
        assert "lost Redis" in proc.output()
        assert "Redis is back" in proc.output()
    finally:
        env.stop_all()
        client.close()


def test_noop_consumer_drains_and_counts(env: Env, bredis: redis_lib.Redis) -> None:
    queue = RedisQueue(bredis, keys.NOOP_QUEUE)
    queue.push(*(envelope.dumps(order_placed(i)) for i in range(1, 501)))
    env.start("noop", CONSUMER_BATCH_SIZE="100", LOG_LEVEL="WARNING")
    wait_for(lambda: queue.stats()["processed"] == 500, timeout=30, message="500 no-op jobs")
    assert queue.stats()["in_flight"] == 0


def test_a_message_that_crashes_the_payment_worker_is_dead_lettered_and_the_rest_paid(
    env: Env, bredis: redis_lib.Redis
) -> None:
    """PAYMENT_CRASH_EMAIL makes the charge os._exit(137) (a segfaulting library). A
    supervisor (this loop, as Docker's restart policy) starts the worker again each
    time; the reaper counts each death; the innocent orders taken in the same batch
    are paid; after CONSUMER_MAX_CRASHES deaths the poison is dead-lettered."""
    queue = RedisQueue(bredis, "payment")
    poison = events_of([order_placed(1, "boom@example.com")])
    innocent = events_of([order_placed(n) for n in range(2, 6)])
    queue.push(*poison, *innocent)
    extra = {
        "PAYMENT_CRASH_EMAIL": "boom@example.com",
        "CONSUMER_MAX_CRASHES": "3",
        "CONSUMER_HEARTBEAT_TTL": "1",
        "CONSUMER_BATCH_SIZE": "10",
    }
    deaths = 0
    proc = env.start("payment", **extra)

    def settled() -> bool:
        nonlocal proc, deaths
        if not proc.alive():
            assert proc.popen.returncode == 137, proc.output()
            deaths += 1
            proc = env.start("payment", **extra)
        return queue.stats()["dead_letters"] == 1 and rows(env.engine(), store.Payment) == 4

    wait_for(settled, timeout=90, interval=0.1, message="poison dead-lettered, the rest paid")
    [letter] = queue.dead_letters()
    assert letter.raw == poison[0]
    assert letter.error == "worker died 3 times handling it"
    assert deaths == 3
    assert rows(env.engine(), store.GatewayCharge) == 4


def events_of(items: list[dict[str, Any]]) -> list[bytes]:
    return [envelope.dumps(e).encode() for e in items]


def test_email_keeps_one_smtp_connection_and_reconnects_after_the_server_restarts(
    tmp_path: Path,
) -> None:
    """Real smtp-sink processes: messages share a connection; a restart is reconnected."""
    from consumers.email import EmailHandler

    port = free_port()
    mail_dir = tmp_path / "mail"
    sink_env = {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(port), "SMTP_SINK_DIR": str(mail_dir)}
    engine = store.make_engine(f"sqlite:///{tmp_path / 'email.db'}")
    store.create_tables(engine, "email")
    handler = EmailHandler(engine, host="127.0.0.1", port=port, sender="shop@example.com")
    sink = Proc([str(BIN / "smtp-sink")], sink_env, tmp_path / "sink.log")
    try:
        sink.wait_output("smtp-sink: listening")
        handler.handle(order_placed(1))
        first = handler._local.smtp
        handler.handle(order_placed(2))
        assert handler._local.smtp is first  # the same connection, not one per message
        sink.popen.terminate()
        sink.popen.wait(15)
        sink = Proc([str(BIN / "smtp-sink")], sink_env, tmp_path / "sink.log", append=True)
        sink.wait_output("smtp-sink: listening", count=2)
        handler.handle(order_placed(3))  # the kept connection is dead: reconnects once
        assert handler._local.smtp is not first
        # The sink says 421 to a connected client when it stops (RFC 5321 3.8): a batch
        # on that kept connection reconnects too, and nothing fails.
        second = handler._local.smtp
        sink.popen.terminate()
        sink.popen.wait(15)
        sink = Proc([str(BIN / "smtp-sink")], sink_env, tmp_path / "sink.log", append=True)
        sink.wait_output("smtp-sink: listening", count=3)
        results = handler.handle_batch([order_placed(4), order_placed(5)])
        assert all(isinstance(result, list) for result in results), results
        assert handler._local.smtp is not second
    finally:
        handler.close()
        sink.popen.terminate()
        sink.popen.wait(15)
    assert len(list(mail_dir.glob("*.eml"))) == 5
    assert rows(engine, store.EmailSent) == 5


def _sink(env: Env, port: int, mail_dir: Path) -> Proc:
    sink = Proc(
        [str(BIN / "smtp-sink")],
        {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(port), "SMTP_SINK_DIR": str(mail_dir)},
        env.tmp / "sink.log",
    )
    env.procs.append(sink)
    sink.wait_output("smtp-sink: listening")
    return sink


def _message_ids(mail_dir: Path) -> list[str]:
    return [
        str(email.message_from_bytes(f.read_bytes(), policy=default_policy)["Message-ID"])
        for f in mail_dir.glob("*.eml")
    ]


@pytest.mark.parametrize("batch", ["1", "10"])
def test_two_email_workers_and_every_order_placed_twice_send_one_email_each(
    env: Env, bredis: redis_lib.Redis, batch: str
) -> None:
    """The claim commits before the send: the second copy waits (retried) and then
    re-emits the first one's outcome; no crash needed for a duplicate without it.
    Batch 10: the batch path claims a whole batch in one transaction, with the same
    result."""
    port, mail_dir = free_port(), env.tmp / "mail"
    _sink(env, port, mail_dir)
    queue = RedisQueue(bredis, "email")
    orders = [envelope.dumps(order_placed(n, f"c{n}@example.com")) for n in range(1, 31)]
    queue.push(*(copy for raw in orders for copy in (raw, raw)))  # side by side
    smtp = {"SMTP_PORT": str(port), "SMTP_HOST": "127.0.0.1", "CONSUMER_BATCH_SIZE": batch}
    env.start("email", CONSUMER_CONCURRENCY="2", **smtp)
    env.start("email", CONSUMER_CONCURRENCY="2", **smtp)
    wait_for(lambda: queue.stats()["processed"] == 60, timeout=90, message="60 messages acked")
    ids = _message_ids(mail_dir)
    assert len(ids) == 30 and len(set(ids)) == 30  # one email per order, no re-send
    assert rows(env.engine(), store.EmailSent) == 30
    sent = [u for u in updates(bredis) if u["type"] == envelope.CUSTOMER_NOTIFIED]
    assert len(sent) == 60 and len({u["id"] for u in sent}) == 30  # the same outcome twice


def test_an_email_claimed_by_a_worker_that_died_before_sending_is_still_sent(
    env: Env, bredis: redis_lib.Redis
) -> None:
    """A claim whose owner died (its lease runs out on the database's clock) is taken
    over by the next delivery: the email is sent once, not lost."""
    port, mail_dir = free_port(), env.tmp / "mail"
    _sink(env, port, mail_dir)
    engine = env.engine()
    with Session(engine) as session, session.begin():
        session.add(
            store.EmailClaim(
                order_id=9, step="received", owner="dead", event_id="e", state="sending",
                lease_until_ms=session.scalar(select(database.now_ms("sqlite"))) + 2000,
            )
        )  # fmt: skip
    queue = RedisQueue(bredis, "email")
    queue.push(envelope.dumps(order_placed(9)))
    env.start("email", SMTP_PORT=str(port), SMTP_HOST="127.0.0.1")
    wait_for(lambda: queue.stats()["processed"] == 1, timeout=30, message="the email sent")
    # It waited out the dead owner's lease in the handler (no attempt spent), then took
    # the claim over: the claim is now another owner's, and sent.
    assert queue.stats()["retried"] == 0 and queue.stats()["dead"] == 0
    with Session(engine) as session:
        claim = session.get(store.EmailClaim, (9, "received"))
        assert claim is not None and claim.owner != "dead" and claim.state == "sent"
    assert _message_ids(mail_dir) == ["<order-9.received@example.com>"]
