"""The README's experiments, run as written: ``make up`` and the short make commands.

Each test starts ``make up`` (supervisor, every real process) in a directory of its own
(LAB_HOME) on free ports (REDIS_PORT, PORT, SMTP_PORT), so it never touches a
developer's stack on 6379/8000/1025, then does what the README tells a learner to do
(``make kill s=payment``, ``make stop s=subscriber``, ``make start``, ``make ps``,
``make logs``, ``.venv/bin/orders-admin queues``) and checks the promised result. Every
test ends the stack the documented way (``make down`` or Ctrl-C) and checks that the
shutdown was graceful: services first, Redis last, and no SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib

from devtools.procs import Timeout, http_ok, wait_until
from devtools.redis_server import RedisServer, free_port
from messaging import monitor
from tests.helpers import Proc, wait_for

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SERVICES = [
    "mail", "updates", "subscriber", "publisher", "payment", "invoice", "shipping", "email",
    "stream", "api",
]  # fmt: skip
"""Every program but Redis (and the log listener), as `make ps` names them."""
START_TIMEOUT = 240.0
"""`make up` may build the Go subscriber and install the venv first on a busy machine."""
# Variables of the developer's shell that would point the stack somewhere else.
_FOREIGN = re.compile(
    r"^(REDIS_|SMTP_|PAYMENT_|CONSUMER_|METRICS_PORT$|PORT$|HOST$|PATTERN$|LAB_HOME$|STREAM_"
    r"|DATABASE_URL$|[A-Z]+_DATABASE_URL$|PROMETHEUS_MULTIPROC_DIR$|MAKE|MFLAGS)"
)


class Lab:
    """One ``make up`` in ``home`` with its own ports, driven through make."""

    def __init__(self, home: Path, **env: str) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.home = home
        self.port = free_port()
        self.redis_port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not _FOREIGN.match(k)}
        self.env.update(
            LAB_HOME=str(home),
            PORT=str(self.port),
            REDIS_PORT=str(self.redis_port),
            SMTP_PORT=str(free_port()),
            STREAM_PORT=str(free_port()),
            **env,
        )
        self.up: Proc | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self, name: str) -> str:
        """What program ``name`` wrote so far (var/log/NAME.log)."""
        path = self.home / "var" / "log" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def make(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run ``make ARGS`` in the checkout with this lab's environment."""
        return subprocess.run(
            ["make", "--no-print-directory", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def states(self) -> dict[str, str]:
        """``make ps`` as {program: state}."""
        out = self.make("ps").stdout
        return dict(line.split()[:2] for line in out.splitlines() if len(line.split()) >= 2)

    def start(self) -> Lab:
        # Proc puts make in its own session: os.killpg(SIGINT) is a terminal's Ctrl-C.
        self.up = Proc(["make", "--no-print-directory", "up"], self.env, self.home / "up.out", ROOT)
        wait_for(
            lambda: http_ok(f"{self.url}/healthz") or not self.up.alive(),  # type: ignore[union-attr]
            START_TIMEOUT,
            0.2,
            "the order API of make up",
        )
        self.up.check_alive()
        last: dict[str, str] = {}

        def all_running() -> dict[str, str]:
            last.clear()
            last.update(self.states())
            return last if all(last.get(n) == "RUNNING" for n in ["redis", *SERVICES]) else {}

        try:
            wait_until(all_running, 60, 0.2, "every program RUNNING in make ps")
        except Timeout as exc:
            # Say which program did not start, and what it printed, not only that one did not.
            late = [n for n in ["redis", *SERVICES] if last.get(n) != "RUNNING"]
            logs = "\n".join(f"--- {n}.log (end) ---\n{self.log(n)[-2000:]}" for n in late)
            pytest.fail(f"{exc}: {late} not RUNNING in {last}\n{logs}")
        return self

    def finish(self, how: str = "down") -> str:
        """End the stack with ``make down`` or Ctrl-C; returns supervisord's log."""
        assert self.up is not None
        if how == "down":
            result = self.make("down", timeout=200)
            assert result.returncode == 0, result.stdout + result.stderr
            assert "make down: stopped" in result.stdout
        else:
            os.killpg(self.up.popen.pid, signal.SIGINT)
        self.up.popen.wait(200)
        return (self.home / "var" / "log" / "supervisord.log").read_text()

    def order(self, email: str, key: str) -> dict[str, Any]:
        """POST /orders as the README does (one book, an Idempotency-Key)."""
        body = {
            "customer_email": email,
            "currency": "EUR",
            "items": [{"sku": "BOOK-1", "quantity": 2, "unit_price": "12.50"}],
        }
        request = urllib.request.Request(
            f"{self.url}/orders",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Idempotency-Key": key},
        )
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (loopback)
            assert response.status == 201
            return dict(json.load(response))

    def get(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as response:  # noqa: S310
            return dict(json.load(response))


def assert_graceful(supervisor_log: str) -> None:
    """Services stopped before Redis, Redis before the log listener, no SIGKILL sent."""
    assert "with SIGKILL" not in supervisor_log  # supervisor's "killing 'x' ... with SIGKILL"
    stopped = re.findall(r"stopped: (\w+) \((exit status \d+|terminated by \w+)\)", supervisor_log)
    last = {name: i for i, (name, _) in enumerate(stopped)}
    assert set(SERVICES) <= set(last), stopped
    assert all(last[name] < last["redis"] for name in SERVICES), stopped
    assert last["logs"] > last["redis"], stopped
    # The final shutdown: every program exited 0 on its SIGTERM.
    final = stopped[-len(SERVICES) - 2 :]
    assert all(status == "exit status 0" for _, status in final), final


@pytest.fixture
def new_lab(tmp_path: Path) -> Iterator[Callable[..., Lab]]:
    """Make a :class:`Lab` in a fresh LAB_HOME; whatever a test leaves running is
    stopped afterwards through that lab's own supervisor socket."""
    labs: list[Lab] = []

    def make(name: str = "lab", **env: str) -> Lab:
        labs.append(Lab(tmp_path / name, **env))
        return labs[-1]

    yield make
    for lab in labs:
        if (lab.home / "var" / "supervisor.sock").exists():
            lab.make("down", timeout=200)
        if lab.up is not None and lab.up.alive():
            lab.up.terminate(200)


def queue_row(lab: Lab, queue: str) -> dict[str, int]:
    """The README's ``.venv/bin/orders-admin queues``, one row as {column: value}."""
    out = subprocess.run(
        [".venv/bin/orders-admin", "queues"],
        cwd=ROOT,
        env=lab.env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    row = next(line.split() for line in out.splitlines() if line.split()[:1] == [queue])
    return {"pending": int(row[1]), "in flight": int(row[2]), "dead": int(row[4])}


OWN_TABLES = {
    "orders": {"orders", "order_lines", "outbox", "order_history"},
    "payment": {"consumer_processed", "payment_gateway_charges", "payments"},
    "invoice": {"consumer_processed", "invoice_counters", "invoices"},
    "shipping": {"consumer_processed", "shipments"},
    "email": {"consumer_processed", "email_recipients", "emails_sent", "email_claims"},
}
"""The tables of each service's SQLite file under ``make up`` (var/NAME.db)."""


def tables(path: Path) -> set[str]:
    """The table names of one SQLite database file (read-only)."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {name for (name,) in rows if not name.startswith("sqlite_")}


def in_flight(client: redis_lib.Redis, queue: str) -> int:
    """Messages of ``queue`` held by workers, as the dashboard and orders-admin count them."""
    return next(f.in_flight for f in monitor.all_figures(client) if f.name == queue)


def test_kill_the_payment_worker_and_its_message_comes_back(new_lab: Callable[..., Lab]) -> None:
    """README "Try the guarantees": kill -9 payment mid-job; the rest keeps running;
    ``make start s=payment`` and the reaper returns the message: paid once."""
    # 8 s of gateway latency (the README says 3000): room for the kill on a busy machine.
    lab = new_lab(PAYMENT_LATENCY_MS="8000", CONSUMER_HEARTBEAT_TTL="3").start()
    order = lab.order("ada@example.com", "order-2026-0001")

    # The moment payment holds the message (read straight from Redis: the gateway call
    # lasts PAYMENT_LATENCY_MS, and the kill must land inside it).
    client = redis_lib.Redis(port=lab.redis_port)
    try:
        wait_for(lambda: in_flight(client, "payment") == 1, 30, 0.05, "payment in flight")
    finally:
        client.close()
    killed = lab.make("kill", "s=payment")
    assert killed.returncode == 0, killed.stdout + killed.stderr

    # Supervisor keeps everything else running and does not restart payment by itself.
    states = lab.states()
    assert states["payment"] != "RUNNING", states
    assert all(states[n] == "RUNNING" for n in ["redis", *SERVICES] if n != "payment"), states
    assert http_ok(f"{lab.url}/healthz")
    assert queue_row(lab, "payment")["in flight"] == 1  # held by the dead worker
    unpaid = lab.get(f"/orders/{order['id']}")
    assert unpaid["status"] != "completed"
    assert "PaymentCaptured" not in [event["type"] for event in unpaid["history"]]

    started = lab.make("start", "s=payment")
    assert started.returncode == 0, started.stdout + started.stderr
    done = wait_for(
        lambda: (o := lab.get(f"/orders/{order['id']}"))["status"] == "completed" and o,
        90,
        0.3,
        "the order completed after make start s=payment",
    )
    types = [event["type"] for event in done["history"]]
    assert types.count("PaymentCaptured") == 1, types
    assert queue_row(lab, "payment") == {"pending": 0, "in flight": 0, "dead": 0}

    # Each service keeps its own tables in its own database, and nothing else's.
    owned = {name: tables(lab.home / "var" / f"{name}.db") for name in OWN_TABLES}
    assert owned == OWN_TABLES

    # `make logs s=payment` follows that one program's log file.
    with subprocess.Popen(
        ["make", "--no-print-directory", "logs", "s=payment"],
        cwd=ROOT,
        env=lab.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    ) as follow:
        assert follow.stdout is not None
        seen: list[str] = []
        try:  # the file's last 50 lines come at once; the worker's start line is among them
            while len(seen) < 50 and not any("payment: worker" in line for line in seen):
                seen.append(follow.stdout.readline())
        finally:
            os.killpg(follow.pid, signal.SIGTERM)
        assert any("payment: worker" in line for line in seen), seen

    # `make down` of another checkout stops nothing here.
    other = new_lab("other")
    result = other.make("down")
    assert result.returncode == 0 and "nothing running" in result.stdout, result.stdout
    assert lab.states()["api"] == "RUNNING"

    assert_graceful(lab.finish("down"))


PUSHED = re.compile(r"Pushed to queue 'message_queue' \(length: (\d+)\): Hello from Python #(\d+)")
UNHEARD = re.compile(r"Published to channel 'messages' \(0 subscribers\): Hello from Python #(\d+)")


def received(lab: Lab, path: str) -> list[int]:
    """Hello numbers the Go subscriber printed as received from ``path`` (queue, pub-sub)."""
    return [int(n) for n in re.findall(rf"Python #(\d+) .*from {path}\]", lab.log("subscriber"))]


def test_queue_pattern_subscriber_stopped_drains_its_backlog(new_lab: Callable[..., Lab]) -> None:
    """README "Switch the pattern": PATTERN=queue, stop only the subscriber, start it
    again: it prints every message published while it was away. Ended with Ctrl-C."""
    lab = new_lab(PATTERN="queue", PUBLISH_INTERVAL="0.3").start()
    wait_for(lambda: received(lab, "queue"), 30, 0.1, "a queue message")

    stopped = lab.make("stop", "s=subscriber")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    last_seen = max(received(lab, "queue"))
    wait_for(
        lambda: int(PUSHED.findall(lab.log("publisher"))[-1][0]) >= 5,
        30,
        0.1,
        "a backlog of 5 in message_queue",
    )
    away = int(PUSHED.findall(lab.log("publisher"))[-1][1])
    assert lab.states()["publisher"] == "RUNNING"

    assert lab.make("start", "s=subscriber").returncode == 0
    wanted = set(range(last_seen + 1, away + 1))
    wait_for(
        lambda: wanted <= set(received(lab, "queue")),
        30,
        0.1,
        f"messages #{last_seen + 1}..#{away} from the backlog",
    )
    assert not received(lab, "pub-sub")

    assert_graceful(lab.finish("ctrl-c"))


def test_pubsub_pattern_subscriber_stopped_misses_what_was_published(
    new_lab: Callable[..., Lab],
) -> None:
    """README: with PATTERN=pubsub the same experiment loses what was published while
    the subscriber was away (at most once, live listeners only)."""
    lab = new_lab(PATTERN="pubsub", PUBLISH_INTERVAL="0.3").start()
    wait_for(lambda: received(lab, "pub-sub"), 30, 0.1, "a pub/sub message")

    assert lab.make("stop", "s=subscriber").returncode == 0
    wait_for(lambda: len(UNHEARD.findall(lab.log("publisher"))) >= 3, 30, 0.1, "3 unheard")
    before = len(received(lab, "pub-sub"))
    assert lab.make("start", "s=subscriber").returncode == 0
    wait_for(lambda: len(received(lab, "pub-sub")) > before, 30, 0.1, "a message after start")

    unheard = {int(n) for n in UNHEARD.findall(lab.log("publisher"))}
    assert unheard, "the publisher saw no moment without a subscriber"
    assert not unheard & set(received(lab, "pub-sub")), sorted(unheard)
    assert not received(lab, "queue")

    assert_graceful(lab.finish("down"))


def test_redis_port_taken_stops_the_stack_before_any_service_uses_it(
    new_lab: Callable[..., Lab], redis_server_factory: Callable[..., RedisServer]
) -> None:
    """Another Redis on REDIS_PORT: `make up` says so and stops; no service ever talks
    to that foreign server (it answers PING, but it is not the lab's)."""
    lab = new_lab()
    foreign = redis_server_factory(port=lab.redis_port)
    client = redis_lib.Redis(port=foreign.port)
    try:
        client.config_resetstat()  # count only what `make up` sends from here on
        up = Proc(["make", "--no-print-directory", "up"], lab.env, lab.home / "up.out", ROOT)
        wait_for(lambda: not up.alive(), START_TIMEOUT, 0.2, "make up to give up")
        out = up.output()
        assert f"127.0.0.1:{lab.redis_port} is already in use" in out
        assert "Redis could not start" in out
        assert "with SIGKILL" not in out
        # The services only asked who it is (INFO: not the lab's pid) and sent nothing else.
        stats = client.info("commandstats")
        assert set(stats) <= {"cmdstat_info", "cmdstat_config|resetstat"}, stats
        assert client.keys("*") == []  # no Hello message, no worker heartbeat
    finally:
        client.close()


def test_the_short_commands_say_so_when_nothing_is_up(new_lab: Callable[..., Lab]) -> None:
    """`make ps|stop|start|kill` before `make up` (or after `make down`): one line naming
    the lab, not supervisorctl's "no such file"; ps succeeds, the others fail."""
    lab = new_lab()
    expected = {"ps": 0, "stop": 2, "start": 2, "kill": 2}
    for verb, status in expected.items():
        done = lab.make(verb, "s=payment", timeout=30)
        assert done.returncode == status, (verb, done.stdout, done.stderr)
        said = done.stdout.strip().splitlines()
        assert said == [f"make {verb}: nothing running in {lab.home} (make up starts it)"], said
        assert "no such file" not in done.stdout + done.stderr
