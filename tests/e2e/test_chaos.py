"""Chaos: orders through the real API while consumers are SIGKILLed and Redis restarts.

Setup: a dedicated Redis with AOF (``appendfsync always``), the real ``orders-api``
(gunicorn, in-process outbox relays), two worker processes per queue (payment,
invoice, shipping, email, orders-updates), ``smtp-sink``, each service on its own
database.

While at least 500 orders are placed through ``POST /orders`` (a thread pool, each
request retried with its Idempotency-Key), a chaos thread SIGKILLs a random consumer
every fraction of a second and starts a replacement; Redis is SIGKILLed and started
again once midway; poison messages are pushed straight onto every queue. Then we wait
(deadline poll) until everything settles and check the guarantees:

- every order has exactly one charge and one payment outcome;
- a captured order ends ``completed`` with one invoice (gap-free numbers), one
  shipment and two emails (received, shipped); a declined order ends ``cancelled``
  with no invoice, no shipment and two emails (received, payment declined); every
  email has one row and one distinct Message-ID;
- nothing is left in a processing list, pending or delayed; the poison messages, and
  only they, are dead letters.

It runs on two topologies. ``single``: one redis-server, SQLite, 500 orders, Redis
SIGKILLed and restarted. ``cluster``: a Redis Cluster of 3 masters with a replica each,
PostgreSQL, 300 orders (two cores), and instead of the restart one master is SIGKILLed:
its replica is promoted (we wait for the failover), then the old master comes back as
a replica. Every process gets REDIS_CLUSTER=1 and only the seed node's URL.

Run with ``pytest -s tests/e2e/test_chaos.py`` to see the counts.
"""

from __future__ import annotations

import email
import random
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from chaos.stack import order_body, post_order
from consumers import store
from devtools import databases
from devtools.procs import Timeout, http_ok, wait_until
from devtools.redis_server import RedisCluster, RedisServer, free_port
from messaging import envelope, keys
from messaging.queue import RedisQueue
from messaging.worker import REDIS_ERRORS
from orders import lifecycle
from orders.models import Order, OrderHistory
from tests.helpers import BIN, Proc, wait_for
from tests.orders_app import PostgresCluster
from tests.topology import Topology

pytestmark = pytest.mark.e2e

ORDERS = {"single": 500, "cluster": 300}
"""Orders placed per topology (the cluster run also pays for six Redis nodes)."""
WORKERS_PER_QUEUE = 2
MAX_KILLS = 30
"""SIGKILLs during placement (each restart costs a Python start-up on 2 cores)."""
CONSUMERS = ("payment", "invoice", "shipping", "email", "updates")
QUEUE_OF = {name: name for name in keys.CONSUMER_QUEUES}
QUEUE_OF["updates"] = keys.ORDER_UPDATES_QUEUE
POISON = [
    b"\xff\xfe\x00 not utf-8",
    b"this is not json",
    b'{"id":"poison-1","type":"Bogus","version":1,"data":{}}',
    b'{"id":"poison-2","type":"OrderPlaced","version":99,"data":{}}',
]


def _post(url: str, body: dict[str, Any], key: str) -> int:
    try:
        return post_order(url, body, key)
    except urllib.error.HTTPError as exc:
        # 503 (database or Redis busy) and 429 pass: retry. Anything else, a 500 above
        # all, is a bug or a wrong request: fail, never retry it away.
        if exc.code not in (429, 503):
            raise AssertionError(f"POST /orders: {exc.code} {exc.read()!r}") from exc
        return 0
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0


class Cluster:
    """The consumer processes, restartable by name."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp = tmp
        self.env = env
        self.procs: dict[str, list[Proc]] = {name: [] for name in CONSUMERS}
        self.started = 0
        self.kills = 0
        self.lock = threading.Lock()

    def start(self, name: str) -> None:
        with self.lock:
            self.started += 1
            log = self.tmp / f"{name}-{self.started}.log"
            proc = Proc(databases.worker_command(BIN, name), self.env, log)
            self.procs[name].append(proc)

    def live(self, name: str) -> list[Proc]:
        return [p for p in self.procs[name] if p.popen.poll() is None]

    def kill_one(self, rng: random.Random) -> None:
        name = rng.choice(CONSUMERS)
        victims = self.live(name)
        if victims:
            rng.choice(victims).kill()
            self.kills += 1
        while len(self.live(name)) < WORKERS_PER_QUEUE:
            self.start(name)

    def top_up(self) -> None:
        for name in CONSUMERS:
            while len(self.live(name)) < WORKERS_PER_QUEUE:
                self.start(name)

    def stop_all(self) -> list[int]:
        codes = []
        for procs in self.procs.values():
            for proc in procs:
                if proc.popen.poll() is None:
                    codes.append(proc.terminate(timeout=20))
        return codes


@pytest.mark.parametrize("topology_name", ["single", "cluster"])
def test_chaos(topology_name: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    rng = random.Random(20261128)
    n_orders = ORDERS[topology_name]
    crash: Callable[[], None]
    if topology_name == "single":
        server_factory: Callable[..., RedisServer] = request.getfixturevalue("redis_server_factory")
        server = server_factory(appendonly=True, appendfsync="always")
        topology = Topology("single", server.url, cluster=False)
        db_urls = databases.sqlite_urls(tmp_path / "db")

        def crash() -> None:
            server.kill()  # a crash, not a clean shutdown: AOF (always) keeps it all
            server.start()

    else:
        cluster_factory: Callable[..., RedisCluster] = request.getfixturevalue(
            "redis_cluster_factory"
        )
        redis_cluster = cluster_factory(appendfsync="always")
        topology = Topology("cluster", redis_cluster.url, cluster=True)
        postgres: PostgresCluster = request.getfixturevalue("postgres_cluster")
        db_urls = databases.created_urls(postgres.create_database)

        def crash() -> None:
            victim = redis_cluster.kill_master(rng.randrange(redis_cluster.masters))
            redis_cluster.wait_failover()  # a replica took over its slots
            victim.start()  # comes back as a replica of its successor
            redis_cluster.wait_healthy()

    client = topology.client(decode_responses=False)
    mail_dir = tmp_path / "mail"
    smtp_port = free_port()
    api_port = free_port()
    common = {
        **topology.env,
        **databases.environment(db_urls),
        "PATTERN": "both",
        "REDIS_CONNECT_ATTEMPTS": "100",
        "REDIS_CONNECT_RETRY_DELAY": "0.2",
        "LOG_LEVEL": "WARNING",
    }
    sink = Proc(
        [str(BIN / "smtp-sink")],
        {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(smtp_port), "SMTP_SINK_DIR": str(mail_dir)},
        tmp_path / "sink.log",
    )
    api = Proc(
        [str(BIN / "orders-api")],
        {
            **common,
            "HOST": "127.0.0.1",
            "PORT": str(api_port),
            "WEB_CONCURRENCY": "2",
            "RELAY_IN_PROCESS": "1",
            "RELAY_INTERVAL": "0.2",
            "RATE_LIMIT_PER_MINUTE": "0",  # one client places every order
        },
        tmp_path / "api.log",
    )
    cluster = Cluster(
        tmp_path,
        {
            **common,
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(smtp_port),
            "CONSUMER_HEARTBEAT_TTL": "2",
            "CONSUMER_BACKOFF_BASE": "0.1",
            "CONSUMER_BACKOFF_MAX": "1.0",
            "CONSUMER_MAX_ATTEMPTS": "12",
            "CONSUMER_BATCH_SIZE": "5",
            "SMTP_TIMEOUT": "3",  # an email claim's lease: 6 x 3 s after a SIGKILL
            "PAYMENT_TRANSIENT_ERROR_RATE": "0.1",
            "PAYMENT_LATENCY_MS": "5",
        },
    )
    base = f"http://127.0.0.1:{api_port}"
    engines = {name: store.make_engine(url) for name, url in db_urls.items()}
    engine = engines["orders"]
    try:
        wait_for(lambda: http_ok(base + "/healthz"), timeout=30, message="orders-api up")
        sink.wait_output("listening on")
        cluster.top_up()

        # --- chaos while placing orders -------------------------------------------
        placing_done = threading.Event()
        redis_restarted = threading.Event()

        def chaos() -> None:
            while not placing_done.wait(rng.uniform(0.5, 1.5)) and cluster.kills < MAX_KILLS:
                cluster.kill_one(rng)
                if not redis_restarted.is_set() and cluster.kills >= MAX_KILLS // 3:
                    crash()
                    redis_restarted.set()

        def place(n: int) -> int:
            deadline_tries = 60
            for _ in range(deadline_tries):
                order_id = _post(base + "/orders", order_body(n), f"chaos-{n}")
                if order_id:
                    return order_id
                placing_done.wait(0.5)  # the API may be busy while Redis restarts
            raise AssertionError(f"order {n} could not be placed")

        chaos_thread = threading.Thread(target=chaos)
        chaos_thread.start()
        try:
            with ThreadPoolExecutor(8) as pool:
                futures = [pool.submit(place, n) for n in range(n_orders)]
                for i, poison in enumerate(POISON):
                    # Midway, garbage straight onto every queue.
                    futures[n_orders * (i + 1) // (len(POISON) + 1)].result()
                    for name in CONSUMERS:
                        _retry(lambda p=poison, q=QUEUE_OF[name]: client.rpush(keys.pending(q), p))
                order_ids = sorted(f.result() for f in futures)
        finally:
            placing_done.set()
            chaos_thread.join()
        if not redis_restarted.is_set():
            # Intake outran the kills (placing is fast now): crash Redis while the
            # consumers still work through the backlog, so the crash always lands.
            crash()
            redis_restarted.set()
        assert cluster.kills > 0, "the chaos thread never killed a consumer"
        assert len(set(order_ids)) == n_orders
        cluster.top_up()

        # --- wait until everything settles ---------------------------------------
        queues = [RedisQueue(client, QUEUE_OF[name]) for name in CONSUMERS]

        def settled() -> bool:
            with Session(engine) as s:
                final = s.scalar(
                    select(func.count()).select_from(Order).where(Order.status.in_(lifecycle.FINAL))
                )
                notified = s.scalar(
                    select(func.count())
                    .select_from(OrderHistory)
                    .where(OrderHistory.type == envelope.CUSTOMER_NOTIFIED)
                )
            if final != n_orders or (notified or 0) < 2 * n_orders:
                return False
            for q in queues:
                st = q.stats()
                if st["pending"] or st["delayed"] or _in_flight(client, q.name):
                    return False
            return True

        def where() -> str:
            with Session(engine) as s:
                statuses = dict(
                    s.execute(select(Order.status, func.count()).group_by(Order.status)).all()
                )
            figures = {q.name: q.stats() for q in queues}
            return f"every order to settle (statuses {statuses}, queues {figures})"

        try:
            wait_until(settled, 150, 0.5, "every order to settle")
        except Timeout:
            pytest.fail(f"timed out after 150s waiting for {where()}")

        # --- the guarantees --------------------------------------------------------
        processed: Counter[tuple[str, int]] = Counter()
        for name in keys.CONSUMER_QUEUES:
            with Session(engines[name]) as s:
                processed.update(
                    s.execute(select(store.Processed.queue, store.Processed.order_id)).all()
                )
        with Session(engines["payment"]) as s:
            charges = s.execute(
                select(store.GatewayCharge.order_id, store.GatewayCharge.status)
            ).all()
        with Session(engines["invoice"]) as s:
            invoices = s.scalars(select(store.Invoice.invoice_number)).all()
            invoice_orders = s.scalars(select(store.Invoice.order_id)).all()
        with Session(engines["shipping"]) as s:
            shipment_orders = s.scalars(select(store.Shipment.order_id)).all()
        with Session(engines["email"]) as s:
            emails = s.execute(select(store.EmailSent.order_id, store.EmailSent.step)).all()
        with Session(engine) as s:
            history_rows = s.execute(select(OrderHistory.order_id, OrderHistory.type)).all()
            status_of = dict(s.execute(select(Order.id, Order.status)).all())
            statuses = Counter(status_of.values())
        assert sorted(status_of) == order_ids

        payment_outcomes = Counter(
            oid
            for oid, t in history_rows
            if t in (envelope.PAYMENT_CAPTURED, envelope.PAYMENT_DECLINED)
        )
        assert all(payment_outcomes[o] == 1 for o in order_ids), "one payment outcome each"
        assert Counter(oid for oid, _ in charges) == Counter(order_ids), "one charge each"
        assert all(status in ("captured", "declined") for _, status in charges)
        captured = sorted(oid for oid, st in charges if st == "captured")
        declined = sorted(oid for oid, st in charges if st == "declined")
        assert declined, "the scripted decline@example.com orders"
        assert [o for o in order_ids if status_of[o] == "completed"] == captured
        assert [o for o in order_ids if status_of[o] == "cancelled"] == declined
        assert sorted(invoice_orders) == captured, "one invoice per paid order, none else"
        assert sorted(shipment_orders) == captured, "one shipment per paid order, none else"
        year = invoices[0][4:8]
        assert sorted(invoices) == [f"INV-{year}-{n:06d}" for n in range(1, len(invoices) + 1)]
        expected_emails = Counter(
            {(o, "received"): 1 for o in order_ids}
            | {(o, "shipped"): 1 for o in captured}
            | {(o, "payment_declined"): 1 for o in declined}
        )
        assert Counter(emails) == expected_emails, "one email per order and step"
        per_type = Counter(history_rows)
        for o in captured:
            for t in (envelope.INVOICE_ISSUED, envelope.SHIPMENT_BOOKED):
                assert per_type[(o, t)] == 1, (o, t)
        assert all(per_type[(o, envelope.CUSTOMER_NOTIFIED)] == 2 for o in order_ids)
        # One handled event per order on payment; two on email; one per paid order on
        # invoice and shipping.
        assert all(processed[("payment", o)] == 1 for o in order_ids)
        assert all(processed[("email", o)] == 2 for o in order_ids)
        assert all(processed[(q, o)] == 1 for q in ("invoice", "shipping") for o in captured)
        assert not any(processed[(q, o)] for q in ("invoice", "shipping") for o in declined)

        message_ids = []
        for eml in mail_dir.glob("*.eml"):
            msg = email.message_from_bytes(eml.read_bytes(), policy=default_policy)
            message_ids.append(str(msg["Message-ID"]))
        assert len(set(message_ids)) == len(emails), "one distinct Message-ID per email"

        for name, q in zip(CONSUMERS, queues, strict=True):
            dead = sorted(letter.raw for letter in q.dead_letters())
            assert dead == sorted(POISON), f"{name}: only the poison is dead: {dead}"
            assert not _in_flight(client, q.name)

        stats = {q.name: q.stats() for q in queues}
        summary = (
            f"chaos summary: topology={topology_name} orders={n_orders} kills={cluster.kills} "
            f"processes_started={cluster.started} "
            f"{'master_failovers' if topology.cluster else 'redis_restarts'}=1 "
            f"payments={len(charges)} "
            f"captured={sum(1 for _, st in charges if st == 'captured')} "
            f"declined={sum(1 for _, st in charges if st == 'declined')} "
            f"invoices={len(invoices)} shipments={len(shipment_orders)} emails={len(emails)} "
            f"smtp_messages={len(message_ids)} "
            f"duplicate_smtp_sends={len(message_ids) - len(set(message_ids))} "
            f"history={len(history_rows)} statuses={dict(statuses)} "
            + " ".join(
                f"{n}[processed={st['processed']} retried={st['retried']} dead={st['dead']}]"
                for n, st in stats.items()
            )
        )
        print(summary)
        (tmp_path / "summary.txt").write_text(summary + "\n")
    finally:
        codes = cluster.stop_all()
        api.terminate(timeout=20)
        sink.terminate()
        for each in engines.values():
            each.dispose()
        client.close()
    assert all(code == 0 for code in codes), codes


def _in_flight(client: redis_lib.Redis, queue: str) -> int:
    """Messages in ANY processing list of the queue (registered worker or not)."""
    return sum(int(client.llen(key)) for key in client.scan_iter(match=keys.processing(queue, "*")))


def _retry(action: Callable[[], object], tries: int = 100) -> None:
    """Run a Redis call, retrying while the server restarts."""
    for _ in range(tries):
        try:
            action()
            return
        except REDIS_ERRORS:  # a restart, or a cluster failover in progress
            threading.Event().wait(0.1)
    raise AssertionError("Redis did not come back")
