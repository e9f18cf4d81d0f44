"""The real system as child processes, for fault scenarios (``make chaos``, tests/e2e).

:class:`Stack` runs a dedicated ``redis-server`` with AOF, ``orders-api`` (gunicorn, in-
process outbox relays), ``smtp-sink``, ``consumer`` processes for payment, invoice,
shipping and email and ``orders-updates``, each service on its own SQLite database,
and offers the faults: SIGKILL any of them, stop or kill Redis, cut one consumer's
network to Redis (:class:`TcpProxy`), lock the database. It also places orders like a
careful client (each with an Idempotency-Key, retried until it gets an answer) and
counts what the system did with them, straight from the databases: outcomes, charges,
invoices, shipments, emails.

Nothing here is simulated except where a docstring says so.
"""

from __future__ import annotations

import email
import http.client
import json
import random
import secrets
import signal
import socket
import sqlite3
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import redis as redis_lib
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from consumers import store
from devtools import databases
from devtools.procs import Proc, http_ok, terminate_all, wait_until
from devtools.redis_server import RedisServer, free_port
from messaging import keys
from messaging.queue import RedisQueue
from orders import lifecycle
from orders.models import Order, OrderHistory

BIN = Path(sys.executable).parent

CONSUMERS = ("payment", "invoice", "shipping", "email", "updates")
QUEUE_OF = {name: name for name in keys.CONSUMER_QUEUES}
QUEUE_OF["updates"] = keys.ORDER_UPDATES_QUEUE
CHAOS_API_ENV = {
    "RELAY_CLAIM_SECONDS": "2",
    # Automatic reconciliation (orders.reconcile): a pass every second, re-publishing
    # orders idle for 10 s (an order here takes well under a second; the production
    # default is 300 s). The scenarios that lose Redis writes rely on it.
    "RECONCILE_INTERVAL_SECONDS": "1",
    "RECONCILE_AFTER_SECONDS": "10",
    "ORDER_STUCK_SECONDS": "5",
    # One client (this process) places every order: do not throttle it.
    "RATE_LIMIT_PER_MINUTE": "0",
}
CHAOS_TUNING = {
    "CONSUMER_HEARTBEAT_TTL": "2",
    "CONSUMER_MAX_ATTEMPTS": "12",
    # Retry budgets shorter than the "SMTP down 60 s" outage, so that scenario also
    # proves that transient dead letters are revived once the dependency is back.
    "CONSUMER_RETRY_SECONDS": "20",
    "CONSUMER_REVIVE_SECONDS": "2",
    "CONSUMER_BATCH_SIZE": "5",
    # An email claim's lease is 6 x SMTP_TIMEOUT: a SIGKILLed worker's claim runs out
    # in 18 s instead of a minute (the local sink answers in milliseconds).
    "SMTP_TIMEOUT": "3",
    "PAYMENT_TRANSIENT_ERROR_RATE": "0.05",
    # The crash-looping message's customer: its charge kills the payment process.
    "PAYMENT_CRASH_EMAIL": "crash@example.com",
}


class TcpProxy:
    """A loopback TCP forwarder between one client and Redis, whose link can be cut.

    ``cut()`` is a partition as the client sees it: open connections go silent (bytes
    are no longer forwarded either way) and new connections are accepted but never
    answered, so the client runs into its socket timeouts, as behind a dead switch.
    ``restore()`` closes the silent connections (as TCP would once the timeouts fire)
    and forwards new ones again.
    """

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self._cut = threading.Event()
        self.swallowed = 0
        """Bytes the partition swallowed (the fault's own report: it fired)."""
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self._conns.append(client)
            if self._cut.is_set():
                continue  # held open, never answered
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns.append(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if self._cut.is_set():
                    self.swallowed += len(data)  # the partition swallows it
                    continue
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.close()
            except OSError:
                pass

    def cut(self) -> None:
        """Partition: stop forwarding; new connections hang."""
        self._cut.set()

    def restore(self) -> None:
        """Heal: drop the silent connections, forward new ones."""
        with self._lock:
            conns, self._conns = self._conns, []
        self._cut.clear()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            except OSError:
                pass

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        self.restore()


@dataclass
class Slot:
    """One consumer process position: its name, extra environment and current process."""

    name: str
    env: dict[str, str] = field(default_factory=dict)
    proc: Proc | None = None


@dataclass
class IntakeStats:
    """What the client saw while placing orders."""

    ids: dict[str, int] = field(default_factory=dict)
    """Idempotency-Key -> order id, for every order the API confirmed."""
    statuses: Counter[str] = field(default_factory=Counter)
    """Answers that made the client retry: HTTP codes and connection errors."""
    gave_up: list[str] = field(default_factory=list)
    server_errors: list[str] = field(default_factory=list)
    """5xx answers other than 503: bugs, never retried (the scoreboard fails on them)."""


class Stack:
    """The running system. ``start()`` it, use it, ``stop()`` it."""

    def __init__(
        self,
        root: Path,
        *,
        workers_per_queue: int = 2,
        appendfsync: str = "always",
        consumer_env: dict[str, str] | None = None,
        redis: RedisServer | None = None,
        proxy: bool = True,
        common_env: dict[str, str] | None = None,
        api_env: dict[str, str] | None = None,
        tuning: dict[str, str] | None = None,
        slot_env: dict[str, dict[str, str]] | None = None,
    ) -> None:
        """The defaults are the fault scenarios' setup; tests/e2e passes its own.

        ``redis``: an already running server to use (else a dedicated one with AOF is
        started); ``proxy``: route the first payment consumer through a :class:`TcpProxy`;
        ``common_env``, ``api_env``: added to every process's / the API's environment;
        ``tuning``: replaces :data:`CHAOS_TUNING` in the consumers' environment;
        ``slot_env``: extra environment for every consumer of a name.
        """
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.own_redis = redis is None
        self.redis = redis or RedisServer(
            data_dir=root / "redis", appendonly=True, appendfsync=appendfsync
        )  # fmt: skip
        Path(str(self.redis.data_dir)).mkdir(parents=True, exist_ok=True)
        self.use_proxy = proxy
        self.common_env = common_env or {}
        self.api_env = CHAOS_API_ENV if api_env is None else api_env
        self.tuning = CHAOS_TUNING if tuning is None else tuning
        self.slot_env = slot_env or {}
        self.db_urls = databases.sqlite_urls(root / "db")  # each service its own
        self.db_path = root / "db" / "orders.db"
        self.db_url = self.db_urls["orders"]
        self.mail_dir = root / "mail"
        self.smtp_port = free_port()
        self.api_port = free_port()
        self.base = f"http://127.0.0.1:{self.api_port}"
        self.stream_port = free_port()
        self.stream_base = f"http://127.0.0.1:{self.stream_port}"
        self.admin_token = secrets.token_urlsafe(32)
        self.bursts: tuple[float, float] | None = None
        """While :meth:`place` runs: (first burst's start, seconds between bursts)."""
        """The API's ADMIN_TOKEN (operator endpoints: Authorization: Bearer ...)."""
        self.common: dict[str, str] = {}
        self.consumer_env = consumer_env or {}
        self.workers_per_queue = workers_per_queue
        self.slots: list[Slot] = []
        self.proxy: TcpProxy | None = None
        self.api: Proc | None = None
        self.stream: Proc | None = None
        self.sink: Proc | None = None
        self.started = 0
        self.engine: Engine | None = None
        self.engines: dict[str, Engine] = {}
        self.client: redis_lib.Redis | None = None
        self._lock = threading.Lock()

    # --- lifecycle ------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return self.base

    def start(self) -> Stack:
        if self.own_redis:
            self.redis.start()
        self.client = redis_lib.Redis.from_url(self.redis.url, socket_timeout=5)
        self.common = {
            "REDIS_URL": self.redis.url,
            **databases.environment(self.db_urls),
            "PATTERN": "both",
            "REDIS_CONNECT_ATTEMPTS": "300",
            "REDIS_CONNECT_RETRY_DELAY": "0.2",
            "LOG_LEVEL": "WARNING",
            **self.common_env,
        }
        self.start_sink(wait=False)
        self.start_api()
        self.start_stream()
        if self.use_proxy:
            self.proxy = TcpProxy(self.redis.port)
        for name in CONSUMERS:
            for i in range(self.workers_per_queue):
                env: dict[str, str] = dict(self.slot_env.get(name, {}))
                if self.proxy is not None and name == "payment" and i == 0:
                    env["REDIS_URL"] = self.proxy.url  # the partition scenario cuts this one
                self.slots.append(Slot(name, env))
        for slot in self.slots:
            self.start_slot(slot)
        wait_until(lambda: "listening on" in self.sink.output(), 30, message="smtp-sink")  # type: ignore[union-attr]
        self.engines = {name: store.make_engine(url) for name, url in self.db_urls.items()}
        self.engine = self.engines["orders"]
        wait_until(self.workers_registered, 60, 0.1, "every consumer registered")
        return self

    def start_sink(self, wait: bool = True) -> None:
        """``smtp-sink`` on the stack's SMTP port (again, after :meth:`stop_sink`)."""
        self.sink = Proc(
            [str(BIN / "smtp-sink")],
            {
                "SMTP_HOST": "127.0.0.1",
                "SMTP_PORT": str(self.smtp_port),
                "SMTP_SINK_DIR": str(self.mail_dir),
            },
            self.root / "sink.log",
            append=True,
        )
        if wait:
            wait_until(self.sink_listening, 30, 0.05, "smtp-sink back")

    def sink_listening(self) -> bool:
        """True when something accepts connections on the SMTP port."""
        try:
            with socket.create_connection(("127.0.0.1", self.smtp_port), timeout=1):
                return True
        except OSError:
            return False

    def stop_sink(self) -> None:
        """Stop ``smtp-sink`` (SIGTERM): from now on every send is refused."""
        if self.sink is not None:
            self.sink.terminate(20.0)
        wait_until(lambda: not self.sink_listening(), 30, 0.05, "smtp-sink gone")

    def workers_registered(self) -> bool:
        try:
            return all(
                self.client.scard(keys.workers(QUEUE_OF[name])) >= self.workers_per_queue  # type: ignore[union-attr]
                for name in CONSUMERS
            )
        except redis_lib.RedisError:
            return False

    def start_api(self) -> None:
        self.api = Proc(
            [str(BIN / "orders-api")],
            {
                **self.common,
                "HOST": "127.0.0.1",
                "PORT": str(self.api_port),
                "WEB_CONCURRENCY": "2",
                "RELAY_IN_PROCESS": "1",
                "RELAY_INTERVAL": "0.2",
                "STREAM_PORT": str(self.stream_port),
                "ADMIN_TOKEN": self.admin_token,
                **self.api_env,
            },
            self.root / "api.log",
            append=True,
        )
        wait_until(self.healthy, 60, 0.1, "orders-api /healthz")

    def start_stream(self) -> None:
        """``orders-stream``, the dashboard's live feed (the page finds it on stream_port)."""
        self.stream = Proc(
            [str(BIN / "orders-stream")],
            {**self.common, "HOST": "127.0.0.1", "STREAM_PORT": str(self.stream_port)},
            self.root / "stream.log",
            append=True,
        )
        wait_until(lambda: http_ok(self.stream_base + "/healthz"), 60, 0.1, "orders-stream")

    def healthy(self) -> bool:
        return http_ok(self.base + "/healthz")

    def metric(self, name: str) -> float:
        """The sum of one metric's samples on orders-api's ``/metrics`` (all workers)."""
        request = urllib.request.Request(
            self.base + "/metrics", headers={"Authorization": f"Bearer {self.admin_token}"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.split(" ", 1)[0].split("{", 1)[0] == name
        )

    def consumer_environment(self, slot: Slot) -> dict[str, str]:
        return {
            **self.common,
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(self.smtp_port),
            "CONSUMER_BACKOFF_BASE": "0.1",
            "CONSUMER_BACKOFF_MAX": "1.0",
            **self.tuning,
            **self.consumer_env,
            **slot.env,
        }

    def start_slot(self, slot: Slot) -> None:
        with self._lock:
            self.started += 1
            n = self.started
        log = self.root / f"{slot.name}-{n}.log"
        env = self.consumer_environment(slot)
        slot.proc = Proc(databases.worker_command(BIN, slot.name), env, log, append=True)

    def restart_slots(self, name: str, env: dict[str, str]) -> None:
        """Stop (SIGTERM) every consumer of ``name`` and start it with ``env`` added."""
        for slot in self.slots:
            if slot.name == name and slot.proc is not None:
                slot.proc.terminate(20.0)
                slot.env = {k: v for k, v in slot.env.items() if k == "REDIS_URL"} | env
                self.start_slot(slot)

    def kill_random_consumer(self, rng: random.Random) -> bool:
        """SIGKILL one consumer at random and start its replacement at once.

        Returns True when the kill landed: the process was running and died of it.
        """
        slot = rng.choice(self.slots)
        landed = False
        if slot.proc is not None:
            was_alive = slot.proc.alive()
            slot.proc.kill()
            landed = was_alive and slot.proc.popen.returncode == -signal.SIGKILL
        self.start_slot(slot)
        return landed

    def logs(self) -> str:
        """Every process's output (the tail of each), for failure messages."""
        procs = {"api": self.api, "stream": self.stream, "sink": self.sink}
        procs |= {f"{slot.name}-{i}": slot.proc for i, slot in enumerate(self.slots)}
        return "\n".join(
            f"--- {name}\n{proc.output()[-3000:]}"
            for name, proc in procs.items()
            if proc is not None
        )

    def stop(self) -> list[int]:
        workers = [slot.proc for slot in self.slots if slot.proc is not None and slot.proc.alive()]
        others = [proc for proc in (self.api, self.stream, self.sink) if proc is not None]
        codes = terminate_all([*workers, *others], 20.0)[: len(workers)]  # the workers' codes
        if self.proxy is not None:
            self.proxy.close()
        for engine in self.engines.values():
            engine.dispose()
        if self.client is not None:
            self.client.close()
        self.redis.stop()
        return codes

    # --- faults on Redis ------------------------------------------------------------

    def set_appendfsync(self, policy: str) -> None:
        self.redis.appendfsync = policy  # survives the restarts below
        self.client.config_set("appendfsync", policy)  # type: ignore[union-attr]

    @property
    def aof_path(self) -> Path:
        return Path(str(self.redis.data_dir)) / "appendonly.aof"

    def restart_redis(self) -> None:
        self.redis.start(timeout=60)

    # --- the database ---------------------------------------------------------------

    def lock_database(self, seconds: float, stop: threading.Event | None = None) -> bool:
        """Hold SQLite's exclusive lock from another connection for ``seconds``.

        Returns True when a probe writer, meanwhile, found the database locked: the
        lock was really held (the fault fired).
        """
        conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        try:
            conn.execute("BEGIN EXCLUSIVE")
            probe = sqlite3.connect(self.db_path, timeout=0, isolation_level=None)
            try:
                probe.execute("BEGIN IMMEDIATE")
                held = False
                probe.execute("ROLLBACK")
            except sqlite3.OperationalError as exc:
                held = "locked" in str(exc)
            finally:
                probe.close()
            (stop or threading.Event()).wait(seconds)
            conn.execute("ROLLBACK")
        finally:
            conn.close()
        return held

    # --- placing orders -------------------------------------------------------------

    def post_order(
        self, key: str, body: dict[str, Any], stats: IntakeStats, give_up: float
    ) -> None:
        """POST until the API confirms (201/200) or ``give_up`` seconds passed."""
        deadline = time.monotonic() + give_up
        delay = 0.05
        while time.monotonic() < deadline:
            try:
                order_id = post_order(self.base + "/orders", body, key)
                with self._lock:
                    stats.ids[key] = order_id
                return
            except urllib.error.HTTPError as exc:
                if exc.code >= 500 and exc.code != 503:
                    # A 500 is a bug, not a passing condition: record it, do not retry.
                    with self._lock:
                        stats.server_errors.append(f"{key}: {exc.code} {exc.read()[:300]!r}")
                    return
                if exc.code not in (429, 503):
                    raise AssertionError(f"POST /orders: {exc.code} {exc.read()!r}") from exc
                outcome = str(exc.code)
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
                outcome = type(getattr(exc, "reason", exc)).__name__
            with self._lock:
                stats.statuses[outcome] += 1
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        with self._lock:
            stats.gave_up.append(key)

    def place(
        self,
        prefix: str,
        count: int,
        seconds: float,
        threads: int = 4,
        give_up: float = 120.0,
        burst: int = 1,
    ) -> IntakeStats:
        """Place ``count`` orders spread over about ``seconds``, ``threads`` at a time,
        ``burst`` of them sent at the same instant (then a pause as long as theirs).

        While it runs, :attr:`bursts` is (the first burst's start on the monotonic
        clock, seconds from one burst to the next), for a fault to aim at a burst.
        """
        stats = IntakeStats()
        gap = seconds / max(count, 1)
        start = time.monotonic()
        self.bursts = (start, gap * burst)

        def one(n: int) -> None:
            # Pace the submissions, so faults land while orders are arriving.
            delay = start + (n - n % burst) * gap - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.post_order(f"{prefix}-{n}", order_body(n), stats, give_up)

        try:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(one, range(count)))
        finally:
            self.bursts = None
        return stats

    # --- counting -------------------------------------------------------------------

    def queues(self) -> list[RedisQueue]:
        return [RedisQueue(self.client, QUEUE_OF[name]) for name in CONSUMERS]  # type: ignore[arg-type]

    def backlog(self) -> int:
        """Messages pending, delayed or dead of a transient cause (to be revived) on
        every queue (-1 when Redis does not answer)."""
        try:
            total = 0
            for q in self.queues():
                stats = q.stats()
                total += stats["pending"] + stats["delayed"] + q.revivable()
            return total
        except redis_lib.RedisError:
            return -1

    def dead_letters(self) -> int:
        try:
            return sum(int(self.client.llen(keys.dead(QUEUE_OF[n]))) for n in CONSUMERS)  # type: ignore[union-attr]
        except redis_lib.RedisError:
            return -1

    def in_flight(self) -> int:
        total = 0
        for name in CONSUMERS:
            pattern = keys.processing(QUEUE_OF[name], "*")
            for key in self.client.scan_iter(match=pattern):  # type: ignore[union-attr]
                total += int(self.client.llen(key))  # type: ignore[union-attr]
        return total

    def completed(self, order_ids: Sequence[int]) -> set[int]:
        """The orders among ``order_ids`` that are settled (:func:`lifecycle.settled`).

        Completed with its invoice, shipment and two emails (received, shipped), or
        cancelled with its two emails (received, payment declined).
        """
        if not order_ids:
            return set()
        low, high = min(order_ids), max(order_ids)
        steps: dict[int, set[str]] = {}
        with Session(self.engine) as s:
            status = dict(
                s.execute(select(Order.id, Order.status).where(Order.id.between(low, high))).all()
            )
            for order_id, data in s.execute(
                select(OrderHistory.order_id, OrderHistory.data).where(
                    OrderHistory.order_id.between(low, high),
                    OrderHistory.type == "CustomerNotified",
                )
            ).all():
                steps.setdefault(order_id, set()).add(str(json.loads(data).get("step")))
        return {o for o in order_ids if lifecycle.settled(status.get(o, ""), steps.get(o, set()))}

    def max_order_id(self) -> int:
        with Session(self.engine) as s:
            return int(s.scalar(select(func.max(Order.id))) or 0)

    def effects(self, first_id: int, last_id: int) -> dict[str, int]:
        """Duplicate effects among orders ``first_id..last_id``, from the database and mail.

        ``orders``: orders the database holds in that id range; the others are counts
        of orders with more than one charge, invoice, shipment, email of one step or
        recorded outcome of one kind; ``declined_fulfilled``: cancelled orders that got
        an invoice or a shipment anyway (must be 0); and ``smtp_resends``: emails
        delivered again with the same Message-ID (the documented SMTP window; receivers
        drop them by Message-ID).
        """

        def in_range(column: Any) -> Any:
            return column.between(first_id, last_id)

        def order_ids(service: str, column: Any) -> Counter[int]:
            with Session(self.engines[service]) as s:
                return Counter(s.scalars(select(column).where(in_range(column))).all())

        charges = order_ids("payment", store.GatewayCharge.order_id)
        invoices = order_ids("invoice", store.Invoice.order_id)
        shipments = order_ids("shipping", store.Shipment.order_id)
        with Session(self.engines["email"]) as s:
            emails = Counter(
                s.execute(
                    select(store.EmailSent.order_id, store.EmailSent.step).where(
                        in_range(store.EmailSent.order_id)
                    )
                ).all()
            )
        with Session(self.engine) as s:
            orders = s.scalar(select(func.count()).select_from(Order).where(in_range(Order.id)))
            cancelled = set(
                s.scalars(
                    select(Order.id).where(in_range(Order.id), Order.status == lifecycle.CANCELLED)
                ).all()
            )
            # One outcome per (order, type, step): a payment has one answer, an email
            # one per step. Distinct event ids of one kind are a duplicate effect.
            history = Counter(
                (oid, t, json.loads(data).get("step"))
                for oid, t, data in s.execute(
                    select(OrderHistory.order_id, OrderHistory.type, OrderHistory.data).where(
                        in_range(OrderHistory.order_id)
                    )
                ).all()
            )
        dup = {
            "charges": sum(1 for n in charges.values() if n > 1),
            "invoices": sum(1 for n in invoices.values() if n > 1),
            "shipments": sum(1 for n in shipments.values() if n > 1),
            "emails": sum(1 for n in emails.values() if n > 1),
            "outcomes": sum(1 for n in history.values() if n > 1),
            "declined_fulfilled": len(cancelled & (set(invoices) | set(shipments))),
        }
        return {"orders": int(orders or 0), **dup}

    def mail_files(self) -> set[Path]:
        return set(self.mail_dir.glob("*.eml")) if self.mail_dir.exists() else set()

    @staticmethod
    def smtp_resends(files: set[Path]) -> int:
        """Emails among ``files`` that repeat an earlier one's Message-ID."""
        ids = [
            str(email.message_from_bytes(f.read_bytes(), policy=default_policy)["Message-ID"])
            for f in files
        ]
        return len(ids) - len(set(ids))


def post_order(url: str, body: dict[str, Any], key: str, timeout: float = 30.0) -> int:
    """POST ``body`` (JSON) with an Idempotency-Key once; returns the order's id.

    Raises ``urllib.error.HTTPError`` on an error answer, ``OSError`` on a network error,
    ``ConnectionError`` too when the answer is cut short (the API killed between its
    headers and its body: ``http.client.IncompleteRead``, which is no ``OSError``). The
    order may exist then, so the caller retries with the same key.
    """
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Idempotency-Key": key},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(json.loads(response.read())["id"])
    except http.client.HTTPException as exc:
        raise ConnectionError(f"POST {url}: answer cut short ({exc!r})") from exc


def order_body(n: int) -> dict[str, Any]:
    """An order; some customers trigger the gateway's scripted outcomes."""
    who = {0: "decline@example.com", 1: "flaky@example.com"}.get(n % 10, f"c{n}@example.com")
    return {
        "customer_email": who,
        "currency": "EUR",
        "items": [
            {"sku": f"SKU-{n % 7}", "quantity": 1 + n % 3, "unit_price": "9.99"},
            {"sku": "GIFT-WRAP", "quantity": 1, "unit_price": "0.50"},
        ],
    }
