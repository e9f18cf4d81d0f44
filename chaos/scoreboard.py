"""The fault scoreboard: named fault scenarios against the real stack, one table of figures.

Every scenario places its own orders through ``POST /orders`` (a careful client: an
Idempotency-Key per order, retried on 5xx, 429 and connection errors) while its fault
happens, waits until the system has settled, then counts from the database:

- placed: orders the API confirmed (201/200) to the client;
- completed: orders that are settled: ``completed`` (payment, invoice, shipment, the
  received and shipped emails) or ``cancelled`` (payment declined, the received and
  declined emails);
- lost: orders asked for that never completed;
- duplicated: orders with a second charge, invoice, shipment, email of one step or
  recorded outcome, a cancelled order that was invoiced or shipped anyway, plus orders
  stored beyond one per Idempotency-Key;
- dead-lettered: messages added to the dead-letter lists;
- recover s: from the end of the fault (or of intake, whichever is later) until every
  order of the scenario was complete;
- fault fired: the fault's own count of what it did (SIGKILLs that landed, bytes of
  AOF dropped, bytes a partition swallowed, /readyz failures seen while Redis was
  down, sends the SMTP outage refused...). A scenario whose fault did not fire proved
  nothing: the test fails on 0;
- 5xx: answers other than 503 (a 500 is a bug): never retried, always a failure.

``python -m chaos`` (``make chaos``) runs the full set; ``--quick`` fewer orders and
shorter faults (what CI runs: tests/e2e/test_scoreboard.py).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis as redis_lib

from chaos.stack import CHAOS_API_ENV, CHAOS_TUNING, Stack
from devtools.procs import Timeout, http_ok, wait_until
from devtools.redis_server import Failover, RedisServer, readonly_errors
from devtools.streams import StreamCrowd, grant_ticket
from messaging import envelope, keys
from messaging import worker as worker_module
from messaging.queue import DeadLetter, RedisQueue


@dataclass(frozen=True)
class Params:
    """Sizes of one run."""

    orders: int
    intake_seconds: float
    redis_down_seconds: float
    lock_seconds: float
    partition_seconds: float
    slow_latency_ms: int
    settle_timeout: float
    failover_seconds: float = 4.0


QUICK = Params(
    orders=30,
    intake_seconds=3.0,
    redis_down_seconds=4.0,
    lock_seconds=3.0,
    partition_seconds=4.0,
    slow_latency_ms=250,
    settle_timeout=60.0,
    failover_seconds=3.0,
)
FULL = Params(
    orders=200,
    intake_seconds=12.0,
    redis_down_seconds=10.0,
    lock_seconds=12.0,
    partition_seconds=10.0,
    slow_latency_ms=250,
    settle_timeout=180.0,
    failover_seconds=8.0,
)


@dataclass
class Notes:
    """What a fault reports about itself."""

    text: list[str] = field(default_factory=list)
    cleared_at: float = 0.0
    """time.monotonic() when the fault ended."""
    fired: int = 0
    """How much of the fault happened, counted by the fault itself (0: it missed)."""
    fired_what: str = ""
    """What ``fired`` counts."""

    def add(self, line: str) -> None:
        self.text.append(line)

    def fire(self, count: int, what: str) -> None:
        """Report what the fault did: ``count`` of ``what`` (also a note)."""
        self.fired, self.fired_what = count, what
        self.add(f"{count} {what}")


Fault = Callable[[Stack, Params, threading.Event, Notes], None]
"""Runs during intake (the event is set when intake is done); sets ``cleared_at``."""


@dataclass(frozen=True)
class Scenario:
    name: str
    promise: str
    """What it promises: "none lost, none doubled", or what it may lose."""
    fault: Fault
    quick: bool = True
    """Part of the quick run (CI)."""
    reconcile: bool = False
    """Redis loses writes: the relays' automatic reconciliation must complete the orders
    left stuck (and must have had some to complete, or the scenario proved nothing)."""
    promises_zero: bool = True
    before: Callable[[Stack, Params], None] | None = None
    after: Callable[[Stack, Params], None] | None = None
    burst: int = 1
    """Orders the client sends at the same instant (16: as many as orders-api's request
    threads, so the workers' group commits write several orders per transaction)."""


@dataclass
class Result:
    scenario: Scenario
    asked: int
    placed: int
    completed: int
    lost: int
    duplicated: int
    dead_lettered: int
    recover_seconds: float
    lost_before_reconcile: int | None
    """Orders the automatic reconciliation re-published (they were stuck)."""
    notes: list[str]
    fired: int = 0
    fired_what: str = ""
    server_errors: list[str] = field(default_factory=list)

    @property
    def kept_promise(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and not self.server_errors

    @property
    def proved(self) -> bool:
        """The fault fired (and a reconciling scenario did have orders to reconcile)."""
        if self.fired <= 0:
            return False
        return not self.scenario.reconcile or (self.lost_before_reconcile or 0) > 0


# --- faults -----------------------------------------------------------------------------


def _at(fraction: float, params: Params, start: float) -> None:
    """Sleep until ``fraction`` of the intake time has passed since ``start``."""
    delay = start + fraction * params.intake_seconds - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def kill_consumers(stack: Stack, params: Params, done: threading.Event, notes: Notes) -> None:
    rng = random.Random(20261128)
    kills = 0
    while not done.wait(rng.uniform(0.2, 0.6)):
        kills += stack.kill_random_consumer(rng)
    notes.cleared_at = time.monotonic()
    notes.fire(kills, "SIGKILLs landed")


def _kill_redis(policy: str) -> Fault:
    def fault(stack: Stack, params: Params, done: threading.Event, notes: Notes) -> None:
        start = time.monotonic()
        stack.set_appendfsync(policy)
        _at(0.4, params, start)
        landed = _kill_redis_server(stack)
        stack.restart_redis()
        notes.cleared_at = time.monotonic()
        notes.add(f"SIGKILL + restart, appendfsync {policy}")
        notes.fire(landed, "SIGKILL of redis-server landed")

    return fault


def _kill_redis_server(stack: Stack) -> int:
    """SIGKILL redis-server; 1 when it was running and died of it."""
    process = stack.redis.process
    was_alive = process is not None and process.poll() is None
    stack.redis.kill()
    return int(was_alive and process is not None and process.returncode == -signal.SIGKILL)


def _aof_files(stack: Stack) -> list[Path]:
    """The AOF file(s) Redis appends to (6.2: appendonly.aof; 7: appendonlydir/*.incr.aof)."""
    data = Path(str(stack.redis.data_dir))
    incr = sorted((data / "appendonlydir").glob("*.incr.aof"))
    return incr[-1:] if incr else [stack.aof_path]


def power_loss_everysec(stack: Stack, params: Params, done: threading.Event, notes: Notes) -> None:
    """SIGKILL Redis and drop what ``everysec`` had not fsynced: the last second of AOF.

    A process crash alone loses nothing with ``everysec`` (the kernel still has the
    page cache and writes it out); a power cut or kernel crash loses what the last
    fsync did not cover, up to about one second (two when the disk is slow). We
    emulate that: we sample the AOF's size every 50 ms and, after the SIGKILL, cut the
    file back to its size of one second before. Redis loads a truncated AOF
    (``aof-load-truncated yes``, the default) up to the last whole command.

    The kill lands while orders still arrive, and payment runs slowed (the scenario's
    ``before``), so the dropped second surely holds orders whose payment outcome was
    not yet recorded: the reconciliation must have work, or the scenario proved nothing.
    """
    start = time.monotonic()
    stack.set_appendfsync("everysec")
    aof = _aof_files(stack)[0]
    sizes: list[tuple[float, int]] = []
    _at(0.2, params, start)
    until = time.monotonic() + 1.5
    while time.monotonic() < until:
        sizes.append((time.monotonic(), aof.stat().st_size))
        time.sleep(0.05)
    stack.redis.kill()
    killed = time.monotonic()
    size = aof.stat().st_size
    keep = max((s for t, s in sizes if t <= killed - 1.0), default=size)
    with open(aof, "r+b") as f:
        f.truncate(keep)
    stack.redis.appendfsync = "always"  # the next scenarios run with the safe policy
    stack.restart_redis()
    notes.cleared_at = time.monotonic()
    notes.fire(size - keep, "bytes of AOF dropped (its last second)")


def flushall(stack: Stack, params: Params, done: threading.Event, notes: Notes) -> None:
    """FLUSHALL while orders arrive: every job, retry, heartbeat and processing list gone.

    The outbox has marked those events published, so only reconciliation can bring the
    orders whose work was still queued back; nobody runs ``--reconcile``: the relays'
    automatic pass must (RECONCILE_AFTER_SECONDS later). Payment runs slowed (the
    scenario's ``before``) so that its queue surely holds orders when the flush lands.
    Counted: the keys the flush dropped (DBSIZE just before it) and, in the row's lost
    column, the orders reconciliation re-published.
    """
    start = time.monotonic()
    assert stack.client is not None
    _at(0.4, params, start)
    pipe = stack.client.pipeline(transaction=True)  # nothing lands between the two
    pipe.dbsize()
    pipe.llen(keys.pending("payment"))
    pipe.flushall()
    dropped, payment_jobs, _ok = pipe.execute()
    notes.cleared_at = time.monotonic()
    notes.add(f"{payment_jobs} payment jobs among them")
    notes.fire(int(dropped), "keys dropped by FLUSHALL")


def redis_down(stack: Stack, params: Params, done: threading.Event, notes: Notes) -> None:
    start = time.monotonic()
    _at(0.3, params, start)
    stack.redis.stop()
    # The fault's length; meanwhile the API's readiness probe must see Redis gone.
    not_ready = 0
    until = time.monotonic() + params.redis_down_seconds
    while time.monotonic() < until:
        not_ready += not http_ok(stack.base + "/readyz", timeout=1.0)
        time.sleep(0.2)
    stack.restart_redis()
    notes.cleared_at = time.monotonic()
    notes.add(f"Redis stopped {params.redis_down_seconds:g} s")
    notes.fire(not_ready, "/readyz failures while Redis was down")


def redis_frozen(stack: Stack, params: Params, done: threading.Event, notes: Notes) -> None:
    """SIGSTOP Redis, then SIGCONT: a hang, not a refusal. Connections stay open and
    nothing answers (a stopped VM, a network that drops packets); on SIGCONT every key
    whose TTL ran out meanwhile (workers' heartbeats, leases) expires at once."""
    start = time.monotonic()
    _at(0.3, params, start)
    assert stack.redis.process is not None
    pid = stack.redis.process.pid
    os.kill(pid, signal.SIGSTOP)
    answered, slowest = 0, 0.0
    try:
        until = time.monotonic() + params.redis_down_seconds
        while time.monotonic() < until:
            asked = time.monotonic()
            try:
                urllib.request.urlopen(stack.base + "/readyz", timeout=5.0).close()
            except urllib.error.HTTPError as exc:
                answered += exc.code == 503  # answered, and said Redis is down
                slowest = max(slowest, time.monotonic() - asked)
            except OSError:  # no answer within 5 s: not counted
                slowest = max(slowest, time.monotonic() - asked)
            time.sleep(0.2)
    finally:
        os.kill(pid, signal.SIGCONT)
    notes.cleared_at = time.monotonic()
    notes.add(f"Redis frozen (SIGSTOP) {params.redis_down_seconds:g} s")
    notes.fire(answered, f"/readyz 503s while frozen, the slowest in {slowest:.2f} s")


def redis_full(stack: Stack, params: Params, done: threading.Event, notes: Notes) -> None:
    """Redis out of memory: ``maxmemory`` set below what it holds, ``noeviction`` (the
    policy a queue needs: an evicted key is a lost message). Reads and PING still
    answer, every write is refused with OOM: the outbox's publishes, the workers' takes,
    acks, heartbeats and outcome events, the rate limiter. Then the limit is lifted."""
    start = time.monotonic()
    _at(0.3, params, start)
    client = stack.client
    policy = client.config_get("maxmemory-policy")["maxmemory-policy"]
    client.config_set("maxmemory-policy", "noeviction")
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", max(1, used // 2))
    refused = 0
    try:
        until = time.monotonic() + params.redis_down_seconds
        while time.monotonic() < until:
            try:
                client.set("chaos:oom-probe", "1", px=1000)
            except redis_lib.exceptions.OutOfMemoryError:
                refused += 1
            time.sleep(0.2)
    finally:
        client.config_set("maxmemory", 0)
        client.config_set("maxmemory-policy", policy)
    notes.cleared_at = time.monotonic()
    notes.add(f"Redis at maxmemory (noeviction) {params.redis_down_seconds:g} s")
    notes.fire(refused, "probe writes refused with OOM")


def redis_failover(stack: Stack, params: Params, done: threading.Event, notes: Notes) -> None:
    """A real failover and failback: FAILOVER TO a standby, a few seconds, FAILOVER back.

    Every process keeps talking to the old primary, now a replica: each write there is
    answered ``READONLY`` (counted by the server's own error statistics), each blocked
    BLMOVE is unblocked with an error. No acknowledged write is lost (FAILOVER waits
    until the replica has them all), so the promise is none lost, none doubled.
    """
    start = time.monotonic()
    standby = RedisServer(data_dir=stack.root / "redis-standby")
    Path(str(standby.data_dir)).mkdir(parents=True, exist_ok=True)
    standby.start()
    try:
        pair = Failover(stack.redis, standby)
        pair.attach()
        before = readonly_errors(stack.redis.port)
        _at(0.3, params, start)
        pair.fail_over()
        time.sleep(params.failover_seconds)  # the fault's length
        pair.fail_back()
        notes.cleared_at = time.monotonic()
        answered = readonly_errors(stack.redis.port) - before
    finally:
        standby.stop()
    if answered <= 0:
        raise AssertionError("the demoted primary never answered READONLY: no fault")
    notes.add(f"primary read-only {params.failover_seconds:g} s")
    notes.fire(answered, "READONLY replies from the demoted primary")


POISON_ORDER_ID = 10**9
"""The crash-looping message's order id: no order of the database has it."""


def crash_loop(stack: Stack, params: Params, done: threading.Event, notes: Notes) -> None:
    """One OrderPlaced whose charge kills every payment worker that takes it.

    This fault is also the supervisor (as Docker's restart policy would be): it starts
    each dead payment worker again at once, until the poison is dead-lettered. The
    innocent orders taken in the same batch are returned by the reaper and paid; the
    poison comes alone after its first death and is dead-lettered after
    CONSUMER_MAX_CRASHES deaths ("worker died N times handling it").
    """
    start = time.monotonic()
    _at(0.3, params, start)
    assert stack.client is not None
    poison = envelope.envelope(
        envelope.ORDER_PLACED,
        {
            "order_id": POISON_ORDER_ID,
            "customer_email": CHAOS_TUNING["PAYMENT_CRASH_EMAIL"],
            "currency": "EUR",
            "lines": [{"sku": "X", "quantity": 1, "unit_price": "1.00", "line_total": "1.00"}],
            "total": "1.00",
        },
        message="a poison pill",
        sender="chaos",
        count=0,
    )
    raw = envelope.dumps(poison).encode()
    stack.client.rpush(keys.pending("payment"), raw)
    deaths = 0
    deadline = time.monotonic() + params.settle_timeout

    def dead_lettered() -> str:
        for entry in stack.client.lrange(keys.dead("payment"), 0, -1):  # type: ignore[union-attr]
            letter = DeadLetter.load(entry)
            if letter.raw == raw:
                return letter.error
        return ""

    while not (error := dead_lettered()):
        for slot in stack.slots:
            if slot.name == "payment" and slot.proc is not None and not slot.proc.alive():
                deaths += 1
                stack.start_slot(slot)
        if time.monotonic() > deadline:
            raise AssertionError(f"the poison was not dead-lettered after {deaths} deaths")
        time.sleep(0.05)
    notes.cleared_at = time.monotonic()
    notes.fire(deaths, "payment workers killed by the poison")
    notes.add(f"then dead-lettered: {error!r}")


def recovery_bound(params: Params) -> float:
    """Seconds within which a SIGKILLed worker's messages must be taken again, from the
    settings: its heartbeat lives at most CONSUMER_HEARTBEAT_TTL after its last beat;
    a live worker reaps within one housekeeping interval after that; that worker may
    first finish the batch it holds (CONSUMER_BATCH_SIZE x the gateway latency) and
    block in a take for at most TAKE_TIMEOUT; plus one more housekeeping interval of
    margin for a busy machine."""
    ttl = float(CHAOS_TUNING["CONSUMER_HEARTBEAT_TTL"])
    interval = min(worker_module.HOUSEKEEPING_INTERVAL, ttl / 4)
    batch = int(CHAOS_TUNING["CONSUMER_BATCH_SIZE"]) * params.slow_latency_ms / 1000
    return ttl + interval + batch + worker_module.TAKE_TIMEOUT + interval


class Slowdown:
    """How much slower than its own CPU time a CPU-bound thread runs, measured now.

    A worker's reaper is Python code that needs the CPU in time; on a machine where
    other work holds the cores, every step of it waits in the run queue. The probe is
    a background thread that computes for about 5 ms, sleeps 45 ms (a tenth of a core),
    and keeps each slice's wall time and CPU time (``time.thread_time``). The ratio of
    their sums over a window is how stretched CPU-bound work was in that window: about
    1 on an idle machine, the load per core on a saturated one. Bounds that the
    scenario derives from the settings are stretched by it, so they stay a property of
    the code and are not a wall-clock threshold that only an idle machine meets.
    """

    def __init__(self) -> None:
        self._slices: list[tuple[float, float, float]] = []  # (end, wall, cpu)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slowdown-probe", daemon=True)

    def __enter__(self) -> Slowdown:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.045):
            wall0, cpu0 = time.monotonic(), time.thread_time()
            while time.thread_time() - cpu0 < 0.005:
                sum(range(200))
            wall1, cpu1 = time.monotonic(), time.thread_time()
            self._slices.append((wall1, wall1 - wall0, cpu1 - cpu0))

    def between(self, start: float, end: float) -> float:
        """The slowdown factor over ``[start, end]`` (monotonic seconds), at least 1."""
        inside = [(w, c) for t, w, c in list(self._slices) if start <= t <= end + 0.05]
        wall = sum(w for w, _ in inside)
        cpu = sum(c for _, c in inside)
        return max(1.0, wall / cpu) if cpu > 0 else 1.0


def orphan_recovery(stack: Stack, params: Params, done: threading.Event, notes: Notes) -> None:
    """SIGKILL slow payment workers holding messages; time until those messages are out
    of the dead worker's list and out of pending again (taken by a live worker), and
    assert each time is within :func:`recovery_bound`, stretched by the :class:`Slowdown`
    measured while that recovery ran (1 on an idle machine)."""
    with Slowdown() as slowdown:
        _orphan_recovery(stack, params, done, notes, slowdown)


def _orphan_recovery(
    stack: Stack, params: Params, done: threading.Event, notes: Notes, slowdown: Slowdown
) -> None:
    assert stack.client is not None
    client = stack.client
    times: list[tuple[float, float]] = []  # (seconds to recover, slowdown meanwhile)
    timed = 0
    rng = random.Random(14)
    slots = [s for s in stack.slots if s.name == "payment"]

    def watch(dead_key: bytes, held: list[bytes], killed_at: float) -> None:
        """Until the dead worker's list is reaped and each of its messages was taken
        again: seen in a live worker's processing list, or settled (in no list).

        Not "absent from pending": the relays' automatic reconcile re-publishes the
        OrderPlaced of an order whose message sits in a processing list (after a power
        loss no thread may hold it), byte for byte the same message, at the tail of
        pending. That copy is no orphan; waiting for it to drain timed the backlog (13 s
        of 200 orders behind 250 ms payments), not the reaper.
        """
        deadline = killed_at + 120
        waiting = set(held)
        pattern = keys.processing("payment", "*")
        while time.monotonic() < deadline:
            # Read in the order a message moves (dead list, pending, a live worker's
            # list): a message on its way is seen in one of them, never in none.
            dead = set(client.lrange(dead_key, 0, -1))
            pending = set(client.lrange(keys.pending("payment"), 0, -1))
            live = {
                m
                for key in client.scan_iter(match=pattern)
                if key != dead_key
                for m in client.lrange(key, 0, -1)
            }
            if not dead:
                waiting -= {m for m in waiting if m in live or m not in pending}
            if not waiting:
                now = time.monotonic()
                times.append((now - killed_at, slowdown.between(killed_at, now)))
                return
            time.sleep(0.02)

    give_up = time.monotonic() + params.settle_timeout
    # During intake, and after it until one kill caught a worker holding messages. One
    # fault at a time: the next kill waits until the last one's messages were taken
    # again. Kills every 0.7 s whatever happened (as this row did before) also killed
    # the live workers the bound counts on, so a long intake measured the kill rate
    # (13-36 s with 200 orders), not the reaper.
    while time.monotonic() < give_up:
        if done.wait(0.7):
            if timed:
                break
            time.sleep(0.7)  # intake is over: done.wait no longer paces the kills
        slot = rng.choice(slots)
        if slot.proc is None or not slot.proc.alive():
            continue
        prefix = keys.processing("payment", f"{socket.gethostname()}-{slot.proc.popen.pid}-")
        found = list(client.scan_iter(match=prefix + "*"))
        held = [m for key in found for m in client.lrange(key, 0, -1)]
        slot.proc.kill()
        killed_at = time.monotonic()
        stack.start_slot(slot)
        if found and held:
            timed += 1
            watch(found[0], held, killed_at)
    notes.cleared_at = time.monotonic()
    bound = recovery_bound(params)
    notes.fire(len(times), "SIGKILLs of workers holding messages, timed")
    if times:
        took, stretch = max(times)
        notes.add(
            f"recovered in max {took:.1f} s (bound {bound:.1f} s from settings"
            + (f" x {stretch:.1f} slowdown measured meanwhile" if stretch > 1.05 else "")
            + ")"
        )
    late = [(round(t, 1), round(f, 1)) for t, f in times if t > bound * f]
    if len(times) < timed or late:
        raise AssertionError(
            f"orphan recovery out of bound {bound:.1f} s x slowdown: "
            f"{late} (seconds, slowdown) of {timed}"
        )


def clock_skew(stack: Stack, params: Params, done: threading.Event, notes: Notes) -> None:
    """Payment workers with clocks one hour ahead and one hour behind (libfaketime).

    They score retries (5% transient gateway errors, flaky@ customers) and promote due
    ones; on Redis's clock the skew changes nothing. Counted: the retries scheduled
    while the skewed workers ran.
    """
    queue = RedisQueue(stack.client, "payment")  # type: ignore[arg-type]
    before = queue.stats()["retried"]
    done.wait()
    notes.cleared_at = time.monotonic()
    notes.fire(queue.stats()["retried"] - before, "retries scored while clocks were +1h/-1h")


def _skew_payment(stack: Stack, params: Params) -> None:
    libs = sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))
    if not libs:
        raise RuntimeError("clock skew needs libfaketime (apt-get install faketime)")
    offsets = iter(("+1h", "-1h"))
    for slot in stack.slots:
        if slot.name == "payment" and slot.proc is not None:
            slot.proc.terminate(20.0)
            slot.env = {k: v for k, v in slot.env.items() if k == "REDIS_URL"} | {
                "LD_PRELOAD": str(libs[0]),
                "FAKETIME": next(offsets, "+1h"),
                "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            }
            stack.start_slot(slot)
    wait_until(stack.workers_registered, 60, 0.1, "skewed payment workers")


def _kill_and_restart_api(stack: Stack) -> int:
    """SIGKILL orders-api (master and workers) and start it again; 1 if the kill landed."""
    assert stack.api is not None
    was_alive = stack.api.alive()
    stack.api.kill()
    landed = int(was_alive and stack.api.popen.returncode == -signal.SIGKILL)
    stack.start_api()
    return landed


def kill_api(stack: Stack, params: Params, done: threading.Event, notes: Notes) -> None:
    start = time.monotonic()
    landed = 0
    for fraction in (0.3, 0.6):
        _at(fraction, params, start)
        landed += _kill_and_restart_api(stack)
    notes.cleared_at = time.monotonic()
    notes.fire(landed, "SIGKILLs of gunicorn + workers landed")


BURST_KILL_DELAY = 0.004
"""Seconds into a burst of concurrent POSTs when orders-api is SIGKILLed: its requests
are in flight then, parsed or in a group commit, none of them answered yet."""


def kill_api_in_bursts(stack: Stack, params: Params, done: threading.Event, notes: Notes) -> None:
    """SIGKILL orders-api (master and workers) twice, each time just after a burst of 16
    POSTs arrived: the orders of the group commits in flight die uncommitted with it,
    and their clients' retries (same Idempotency-Key) must store each order once."""
    start, period = wait_until(lambda: stack.bursts, 30, 0.001, "the intake started")
    first = max(1, round(0.3 * params.intake_seconds / period))
    landed = 0
    for burst in (first, max(first + 1, round(0.6 * params.intake_seconds / period))):
        delay = start + burst * period + BURST_KILL_DELAY - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        landed += _kill_and_restart_api(stack)
    notes.cleared_at = time.monotonic()
    notes.fire(landed, f"SIGKILLs landed {BURST_KILL_DELAY * 1000:g} ms into a burst")
    done.wait(params.settle_timeout)
    try:
        transactions = stack.metric("orders_intake_commit_batch_size_count")
    except OSError as exc:
        notes.add(f"group commit sizes unread: {exc}")
        return
    if transactions:
        written = stack.metric("orders_intake_commit_batch_size_sum")
        notes.add(
            f"after the last restart: {written:g} orders in {transactions:g} transactions"
            f" (group commit, {written / transactions:.1f} per transaction)"
        )


def lock_database(stack: Stack, params: Params, done: threading.Event, notes: Notes) -> None:
    start = time.monotonic()
    _at(0.3, params, start)
    held = stack.lock_database(params.lock_seconds)
    notes.cleared_at = time.monotonic()
    notes.add(f"SQLite exclusive lock {params.lock_seconds:g} s")
    notes.fire(int(held), "probe writer refused: the lock was held")


def partition(stack: Stack, params: Params, done: threading.Event, notes: Notes) -> None:
    start = time.monotonic()
    _at(0.3, params, start)
    assert stack.proxy is not None
    swallowed_before = stack.proxy.swallowed
    stack.proxy.cut()
    time.sleep(params.partition_seconds)  # the partition's length
    stack.proxy.restore()
    notes.cleared_at = time.monotonic()
    notes.add(f"1 payment worker cut off {params.partition_seconds:g} s")
    notes.fire(stack.proxy.swallowed - swallowed_before, "bytes swallowed by the partition")


def slow_consumer(stack: Stack, params: Params, done: threading.Event, notes: Notes) -> None:
    peak = 0
    while not done.wait(0.1):
        peak = max(peak, stack.backlog())
    notes.cleared_at = time.monotonic()
    notes.add(f"payment {params.slow_latency_ms} ms/call")
    notes.fire(peak, "messages of backlog at the peak")


SMTP_DOWN_SECONDS = 60.0
"""How long the "SMTP down" fault keeps the mail server away (its name says it)."""


def _refused_sends(stack: Stack) -> int:
    """Email sends the consumers logged as refused: "SMTP host:port unavailable"."""
    needle = f"SMTP 127.0.0.1:{stack.smtp_port} unavailable"
    return sum(
        path.read_text(errors="replace").count(needle) for path in stack.root.glob("email-*.log")
    )


def smtp_down(stack: Stack, params: Params, done: threading.Event, notes: Notes) -> None:
    """The mail server stops for 60 s during intake, then comes back.

    Every send meanwhile is refused (counted from the email workers' own log lines: the
    fault fired). A refused send is a transient failure: retried with capped backoff
    for CONSUMER_RETRY_SECONDS, which the stack sets shorter than the outage, so the
    emails that wait longest are dead-lettered as transient during it; the workers
    revive those by themselves once the server answers again. Promise: every order gets
    each of its emails once, and no dead letter is left.
    """
    start = time.monotonic()
    assert stack.client is not None
    email = RedisQueue(stack.client, "email")
    _at(0.3, params, start)
    before = email.stats()
    refused_before = _refused_sends(stack)
    stack.stop_sink()
    time.sleep(SMTP_DOWN_SECONDS)  # the fault's length
    refused = _refused_sends(stack) - refused_before
    dead = email.stats()["dead"] - before["dead"]
    stack.start_sink()
    notes.cleared_at = time.monotonic()
    notes.add(f"smtp-sink stopped {SMTP_DOWN_SECONDS:g} s")
    notes.fire(refused, "email sends refused while SMTP was down")
    # The revivals happen after the fault: wait for them (the settle counts them too).
    deadline = time.monotonic() + params.settle_timeout
    while email.revivable() and time.monotonic() < deadline:
        time.sleep(0.2)
    revived = email.stats()["revived"] - before["revived"]
    notes.add(
        f"{dead} dead-lettered as transient meanwhile, {revived} transient dead letters revived"
    )


STREAMS = 200
"""Event streams the "open streams" fault holds open during intake."""


def open_streams(stack: Stack, params: Params, done: threading.Event, notes: Notes) -> None:
    """200 dashboard streams held open through intake, plus 20 on orders-api's old URL.

    Before orders-stream, 20 streams took every gunicorn thread and intake stopped; the
    figures say how many streams were live during intake and what they received.
    """
    redirects = 0
    with StreamCrowd(stack.stream_port, STREAMS, grant_ticket(stack.redis.url)) as crowd:
        for _ in range(20):  # orders-api's /events/stream: a redirect, answered at once
            try:
                opener = urllib.request.build_opener(_NoRedirect)
                request = urllib.request.Request(
                    stack.base + "/events/stream",
                    headers={"Authorization": f"Bearer {stack.admin_token}"},
                )
                opener.open(request, timeout=10)
            except urllib.error.HTTPError as exc:
                redirects += exc.code == 307
        peak = 0
        while not done.wait(0.1):
            peak = max(peak, crowd.live)
        events = crowd.events
    notes.cleared_at = time.monotonic()
    notes.fire(peak, "streams open during intake")
    notes.add(
        f"{events} events delivered to them; "
        f"orders-api /events/stream: {redirects}/20 redirected at once"
    )


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def _slow_payment(stack: Stack, params: Params) -> None:
    stack.restart_slots("payment", {"PAYMENT_LATENCY_MS": str(params.slow_latency_ms)})
    wait_until(stack.workers_registered, 60, 0.1, "payment workers back")


def _normal_payment(stack: Stack, params: Params) -> None:
    stack.restart_slots("payment", {})
    wait_until(stack.workers_registered, 60, 0.1, "payment workers back")


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("consumers SIGKILLed", "none lost, none doubled", kill_consumers),
    Scenario(
        "Redis SIGKILL, appendfsync always",
        "none lost, none doubled",
        _kill_redis("always"),
    ),
    Scenario(
        "Redis SIGKILL, appendfsync everysec",
        "none lost, none doubled",
        _kill_redis("everysec"),
        quick=False,
    ),
    Scenario(
        "power loss, appendfsync everysec",
        "loses ~1 s of Redis writes; none lost (automatic reconcile)",
        power_loss_everysec,
        reconcile=True,
        before=_slow_payment,
        after=_normal_payment,
    ),
    Scenario(
        "FLUSHALL mid-intake",
        "none lost, none doubled (automatic reconcile)",
        flushall,
        reconcile=True,
        before=_slow_payment,
        after=_normal_payment,
    ),
    Scenario("Redis down during intake", "none lost, none doubled", redis_down),
    Scenario("Redis frozen (SIGSTOP)", "none lost, none doubled", redis_frozen),
    Scenario("Redis out of memory (noeviction)", "none lost, none doubled", redis_full),
    Scenario("Redis failover (READONLY)", "none lost, none doubled", redis_failover),
    Scenario(
        "crash-looping message",
        "poison dead-lettered; none lost, none doubled",
        crash_loop,
    ),
    Scenario(
        "orphan recovery bound",
        "none lost, none doubled; recovered within the bound",
        orphan_recovery,
        before=_slow_payment,
        after=_normal_payment,
    ),
    Scenario(
        "clock skew",
        "none lost, none doubled",
        clock_skew,
        before=_skew_payment,
        after=_normal_payment,
    ),
    Scenario("orders-api SIGKILLed", "none lost, none doubled", kill_api),
    Scenario(
        "orders-api SIGKILLed in a burst",
        "none lost, none doubled",
        kill_api_in_bursts,
        quick=False,  # tests/integration/test_fault_points.py kills one group commit in CI
        burst=16,
    ),
    Scenario("database locked", "none lost, none doubled", lock_database),
    Scenario(
        "slow consumer",
        "none lost, none doubled",
        slow_consumer,
        before=_slow_payment,
        after=_normal_payment,
    ),
    Scenario("consumer partitioned from Redis", "none lost, none doubled", partition),
    Scenario("200 open streams during intake", "none lost, none doubled", open_streams),
    Scenario(
        "SMTP down 60 s",
        "none lost, none doubled, no dead letter left",
        smtp_down,
        quick=False,  # a minute long: tests/e2e/test_smtp_outage.py runs it on its own
    ),
)


# --- running --------------------------------------------------------------------------


RECONCILE_QUIET = float(CHAOS_API_ENV["RECONCILE_AFTER_SECONDS"]) + 3 * float(
    CHAOS_API_ENV["RECONCILE_INTERVAL_SECONDS"]
)
"""Seconds a scenario that relies on reconciliation waits, nothing moving, on top of the
usual quiet: a stuck order is re-published once it was idle RECONCILE_AFTER_SECONDS,
by the next pass."""


def _settle(stack: Stack, ids: list[int], timeout: float, quiet: float) -> tuple[bool, float]:
    """Wait until every order is complete (True) or nothing moved for ``quiet`` seconds
    with empty queues and nothing in flight (False), or the timeout. A message in
    flight is work a worker still holds (an email waiting out a dead worker's claim):
    never "settled". Returns (complete, monotonic time of the last progress)."""
    deadline = time.monotonic() + timeout
    last_count = -1
    last_change = time.monotonic()
    while True:
        done = len(stack.completed(ids))
        backlog = stack.backlog()
        now = time.monotonic()
        if done != last_count:
            last_count, last_change = done, now
        if done == len(ids) and backlog == 0:
            return True, last_change
        if backlog == 0 and now - last_change > quiet and stack.in_flight() == 0:
            return False, last_change
        if now > deadline:
            return False, last_change

        time.sleep(0.1)


def run_scenario(stack: Stack, scenario: Scenario, params: Params) -> Result:
    if scenario.before:
        scenario.before(stack, params)
    first_id = stack.max_order_id() + 1
    dead_before = stack.dead_letters()
    mail_before = stack.mail_files()
    republished_before = stack.metric("orders_reconcile_republished_total")
    notes = Notes()
    done = threading.Event()
    failure: list[BaseException] = []

    def run_fault() -> None:
        try:
            scenario.fault(stack, params, done, notes)
        except BaseException as exc:  # reported below, never swallowed
            failure.append(exc)
            notes.cleared_at = time.monotonic()

    fault = threading.Thread(target=run_fault, name="fault")
    fault.start()
    prefix = f"{scenario.name}-{int(time.time() * 1000)}".replace(" ", "_").replace(",", "")
    threads = max(4, scenario.burst)
    stats = stack.place(prefix, params.orders, params.intake_seconds, threads, burst=scenario.burst)
    intake_end = time.monotonic()
    done.set()
    fault.join()
    if failure:
        raise RuntimeError(f"{scenario.name}: the fault itself failed") from failure[0]
    for error in stats.server_errors:
        notes.add(f"SERVER ERROR {error}")
    ids = sorted(stats.ids.values())
    # Quiet for 2 heartbeats + a reap: a partitioned or killed worker's messages are back.
    quiet = 6.0 + (RECONCILE_QUIET if scenario.reconcile else 0.0)
    complete, last_progress = _settle(stack, ids, params.settle_timeout, quiet=quiet)
    lost_before: int | None = None
    # (An orders-api restart starts its counters again: then this scenario's count is lost.)
    republished = max(
        0, int(stack.metric("orders_reconcile_republished_total") - republished_before)
    )
    if scenario.reconcile:
        lost_before = republished
    if scenario.reconcile or republished:
        notes.add(f"{republished} stuck orders re-published by the relays' automatic reconcile")
    completed = stack.completed(ids)
    if not complete:
        notes.add(
            f"gave up waiting: {len(completed)}/{len(ids)} complete, backlog {stack.backlog()},"
            f" in flight {stack.in_flight()}, orders {sorted(set(ids) - completed)[:5]}"
        )
    last_id = stack.max_order_id()
    effects = stack.effects(first_id, last_id) if last_id >= first_id else {"orders": 0}
    extra_orders = effects.pop("orders") - len(stats.ids)
    duplicated = sum(effects.values()) + max(0, extra_orders)
    resends = Stack.smtp_resends(stack.mail_files() - mail_before)
    if resends:
        notes.add(f"{resends} SMTP re-sends with the same Message-ID")
    retried = ", ".join(f"{k} x{v}" for k, v in sorted(stats.statuses.items()))
    if retried:
        notes.add(f"client retried: {retried}")
    if scenario.after:
        scenario.after(stack, params)
    return Result(
        scenario=scenario,
        asked=params.orders,
        placed=len(stats.ids),
        completed=len(completed),
        lost=params.orders - len(completed),
        duplicated=duplicated,
        dead_lettered=stack.dead_letters() - dead_before,
        recover_seconds=max(0.0, last_progress - max(notes.cleared_at, intake_end))
        if complete
        else float("nan"),
        lost_before_reconcile=lost_before,
        notes=notes.text,
        fired=notes.fired,
        fired_what=notes.fired_what,
        server_errors=list(stats.server_errors),
    )


def table(results: list[Result]) -> str:
    """The scoreboard as a Markdown table, with what the non-promising rows lose."""
    head = (
        "| scenario | promise | placed | completed | lost | duplicated | dead-lettered "
        "| recover s | fault fired | 5xx | notes |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in results:
        lost = str(r.lost)
        if r.lost_before_reconcile is not None:
            lost += f" ({r.lost_before_reconcile} before reconcile)"
        recover = "never" if r.recover_seconds != r.recover_seconds else f"{r.recover_seconds:.1f}"
        lines.append(
            f"| {r.scenario.name} | {r.scenario.promise} | {r.placed}/{r.asked} | "
            f"{r.completed} | {lost} | {r.duplicated} | {r.dead_lettered} | {recover} | "
            f"{r.fired} | {len(r.server_errors)} | {'; '.join(r.notes)} |"
        )
    lines.append("")
    for r in results:
        if r.lost_before_reconcile is not None or not r.scenario.promises_zero:
            lines.append(
                f"* {r.scenario.name}: without reconciliation {r.lost_before_reconcile or r.lost}"
                f" of {r.asked} orders stayed incomplete: their jobs or outcome events vanished "
                "with the Redis writes lost, after the outbox had marked them published. The "
                "relays' automatic reconciliation re-published their stored OrderPlaced, "
                "nobody ran `orders-relay --reconcile`."
            )
    lines.append(
        "* Pub/sub (`orders:events`, `messages`) is at-most-once by design in every row: "
        "a subscriber that is away or cut off misses what was published meanwhile."
    )
    return "\n".join(lines)


def run(
    params: Params, root: Path, only: list[str] | None = None, quick: bool = False
) -> list[Result]:
    """Start one stack, run the chosen scenarios on it in turn, stop it."""
    chosen = [
        s
        for s in SCENARIOS
        if (not quick or s.quick) and (not only or any(o.lower() in s.name.lower() for o in only))
    ]
    stack = Stack(root).start()
    results: list[Result] = []
    try:
        for scenario in chosen:
            print(f"chaos: {scenario.name} ...", flush=True)
            result = run_scenario(stack, scenario, params)
            print(
                f"chaos:   lost {result.lost}, duplicated {result.duplicated}, "
                f"{'; '.join(result.notes)}",
                flush=True,
            )
            results.append(result)
    finally:
        codes = stack.stop()
    if any(codes):
        raise RuntimeError(f"consumers did not stop cleanly: exit codes {codes}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer orders, shorter faults (CI)")
    parser.add_argument("--only", nargs="*", help="scenarios whose name contains one of these")
    parser.add_argument("--root", type=Path, help="keep logs and data here")
    args = parser.parse_args(argv)
    root = args.root or Path(tempfile.mkdtemp(prefix="chaos-"))
    started = time.monotonic()
    try:
        results = run(QUICK if args.quick else FULL, root, args.only, args.quick)
    except Timeout as exc:
        print(f"chaos: {exc} (logs in {root})", file=sys.stderr)
        return 1
    print()
    print(table(results))
    print(f"\n{len(results)} scenarios in {time.monotonic() - started:.0f} s; logs in {root}")
    broken = [
        r.scenario.name
        for r in results
        if (r.scenario.promises_zero and not r.kept_promise) or r.server_errors
    ]
    if broken:
        print(f"chaos: promise broken in: {', '.join(broken)}", file=sys.stderr)
        return 1
    missed = [r.scenario.name for r in results if not r.proved]
    if missed:
        print(f"chaos: the fault did not fire in: {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0
