"""Retry budgets on a real Redis: time, not only attempts; transient dead letters revived.

A transient failure (the SMTP server refuses connections) is retried with capped
exponential backoff until CONSUMER_RETRY_SECONDS have passed since the message's first
failure, however many attempts that takes; the first failure's time survives the
reaper; an unexpected error still has the attempt limit and a permanent one none; a
transient dead letter goes back to pending by itself, at a bounded rate, and a revived
message that fails again is dead-lettered at once (a probe) to wait twice as long.

Every test runs on one redis-server and on a Redis Cluster (the ``topology`` fixture).
Time is the ``now`` the scripts accept in place of Redis's clock, so an hour of budget
passes without waiting for it; the worker test at the end runs on Redis's own clock.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import pytest
import redis as redis_lib

from messaging import envelope, keys
from messaging.queue import RedisQueue, RetryableError
from messaging.worker import Worker
from tests.helpers import wait_for
from tests.orders_app import order_placed

Q = "budgetq"
T0 = 1_000_000.0


def message(order_id: int) -> bytes:
    event = order_placed(
        order_id,
        event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"budget/{order_id}")),
        timestamp="2026-01-01T00:00:00+00:00",
    )
    return envelope.dumps(event).encode()


def due_time(client: redis_lib.Redis, raw: bytes) -> float:
    score = client.zscore(keys.delayed(Q), raw)
    assert score is not None, "not in the delayed set"
    return float(score)


def fail_transient_until_dead(q: RedisQueue, raw: bytes, start: float) -> list[float]:
    """Take and fail ``raw`` transiently, each time when its retry is due; the failure
    times until it was dead-lettered."""
    now, times = start, []
    for _ in range(10_000):
        [taken] = q.take("w1", 1, timeout=0)
        times.append(now)
        if q.fail("w1", taken, "SMTP refused", transient=True, now=now) == "dead":
            return times
        now = due_time(q.client, raw)
        assert q.promote(now=now) == 1
    raise AssertionError("never dead-lettered")


def test_a_transient_failure_is_retried_for_its_time_budget_not_its_attempts(
    bredis: redis_lib.Redis,
) -> None:
    q = RedisQueue(
        bredis, Q, max_attempts=3, retry_seconds=100.0, backoff_base=1.0, backoff_max=8.0
    )
    raw = message(1)
    q.push(raw)
    times = fail_transient_until_dead(q, raw, T0)
    # Far more than CONSUMER_MAX_ATTEMPTS, and dead only once the budget was spent:
    # every failure before the last fell inside it, the last one at its end.
    assert len(times) > 3 * 3
    assert all(t < T0 + 100.0 for t in times[:-1])
    assert times[-1] == pytest.approx(T0 + 100.0, abs=1e-3)  # last retry due at the end
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert all(0 <= gap <= 8.0 + 1e-6 for gap in gaps)  # capped at backoff_max
    [letter] = q.dead_letters()
    assert letter.cause == "transient" and letter.transient
    assert letter.error == "retry budget of 100 s spent: SMTP refused"
    assert letter.attempts == len(times)
    assert letter.first_failed == pytest.approx(T0, abs=1e-3)
    assert bredis.hlen(keys.attempts(Q)) == 0
    assert q.revivable() == 1


def test_backoff_is_capped_and_jittered_however_many_attempts(bredis: redis_lib.Redis) -> None:
    q = RedisQueue(bredis, Q, retry_seconds=10**6, backoff_base=0.5, backoff_max=4.0)
    raw = message(2)
    q.push(raw)
    delays = []
    for n in range(1, 81):  # beyond 2**62: the exponent is clamped, the delay capped
        [taken] = q.take("w1", 1, timeout=0)
        assert q.fail("w1", taken, "timeout", transient=True, now=T0) == "retried"
        delay = due_time(bredis, raw) - T0
        assert 0 <= delay <= min(4.0, 0.5 * 2 ** (n - 1)) + 1e-6, (n, delay)
        delays.append(delay)
        assert q.promote(now=T0 + 4.0) == 1
    late = delays[10:]
    assert max(late) > 2.0 > min(late)  # full jitter: spread over [0, cap], not fixed


def test_unexpected_errors_keep_the_attempt_limit_and_permanent_ones_none(
    bredis: redis_lib.Redis,
) -> None:
    q = RedisQueue(bredis, Q, max_attempts=3, retry_seconds=3600.0, backoff_base=0.0)
    bug, bad = message(3), message(4)
    q.push(bug)
    outcomes = []
    for _ in range(3):
        [taken] = q.take("w1", 1, timeout=0)
        outcomes.append(q.fail("w1", taken, "KeyError: 'x'", now=T0))
        q.promote(now=T0 + 1)
    assert outcomes == ["retried", "retried", "dead"]  # well inside the time budget
    q.push(bad)
    [taken] = q.take("w1", 1, timeout=0)
    assert q.fail("w1", taken, "invalid data", permanent=True, now=T0) == "dead"
    letters = {letter.raw: letter for letter in q.dead_letters()}
    assert (letters[bug].cause, letters[bug].attempts) == ("attempts", 3)
    assert (letters[bad].cause, letters[bad].attempts) == ("permanent", 1)
    assert q.revivable() == 0  # neither comes back by itself
    assert q.revive(now=T0 + 10**7, bounded=False) == 0


def test_the_first_failure_survives_the_reaper(bredis: redis_lib.Redis) -> None:
    """A worker dies holding a retried message: the next worker's failure is judged
    against the first failure's time, not a budget that restarted."""
    q = RedisQueue(bredis, Q, retry_seconds=60.0, backoff_base=1.0, backoff_max=1.0)
    raw = message(5)
    q.push(raw)
    [taken] = q.take("w1", 1, timeout=0)
    assert q.fail("w1", taken, "refused", transient=True, now=T0) == "retried"
    assert q.promote(now=T0 + 1.0) == 1
    q.heartbeat("doomed", 1)
    [taken] = q.take("doomed", 1, timeout=0)
    bredis.delete(keys.heartbeat(Q, "doomed"))  # it died holding the message
    assert q.reap() == {"doomed": 1}
    [taken] = q.take("w2", 1, timeout=0)
    assert taken == raw
    assert q.fail("w2", taken, "refused", transient=True, now=T0 + 59.0) == "retried"
    assert due_time(bredis, raw) <= T0 + 60.0 + 1e-6  # never beyond the budget's end
    assert q.promote(now=T0 + 60.0) == 1
    [taken] = q.take("w2", 1, timeout=0)
    assert q.fail("w2", taken, "refused", transient=True, now=T0 + 60.0) == "dead"
    [letter] = q.dead_letters()
    assert letter.first_failed == pytest.approx(T0, abs=1e-3) and letter.attempts == 3


def test_a_transient_dead_letter_is_revived_and_probes_with_one_attempt(
    bredis: redis_lib.Redis,
) -> None:
    q = RedisQueue(bredis, Q, retry_seconds=100.0, revive_seconds=30.0, backoff_base=0.0)
    raw = message(6)
    q.push(raw)
    [taken] = q.take("w1", 1, timeout=0)
    assert q.fail("w1", taken, "refused", transient=True, now=T0) == "retried"
    q.promote(now=T0 + 100.0)
    [taken] = q.take("w1", 1, timeout=0)
    assert q.fail("w1", taken, "refused", transient=True, now=T0 + 100.0) == "dead"
    assert q.revive(now=T0 + 129.0, bounded=False) == 0  # due 30 s after it died
    assert q.revive(now=T0 + 130.0, bounded=False) == 1
    assert q.dead_letters() == [] and q.revivable() == 0
    assert bredis.lrange(keys.pending(Q), 0, -1) == [raw]
    # Still down: the revived message is dead again at its first failure (no new
    # budget), and waits twice as long before the next probe.
    [taken] = q.take("w1", 1, timeout=0)
    assert q.fail("w1", taken, "refused", transient=True, now=T0 + 131.0) == "dead"
    [letter] = q.dead_letters()
    assert (letter.revivals, letter.attempts) == (1, 3)
    assert letter.first_failed == pytest.approx(T0, abs=1e-3)
    assert q.revive(now=T0 + 131.0 + 59.0, bounded=False) == 0
    assert q.revive(now=T0 + 131.0 + 60.0, bounded=False) == 1
    # Back: handled and acked; nothing of it is left anywhere.
    [taken] = q.take("w1", 1, timeout=0)
    assert q.ack("w1", [taken]) == 1
    assert q.dead_letters() == [] and q.revivable() == 0
    assert bredis.hlen(keys.attempts(Q)) == 0
    assert q.stats()["revived"] == 2


def test_once_a_probe_succeeds_the_other_letters_follow_without_their_schedules(
    bredis: redis_lib.Redis,
) -> None:
    q = RedisQueue(bredis, Q, retry_seconds=0.0, revive_seconds=100.0)
    probe, a, b = message(10), message(11), message(12)
    q.push(probe)
    [taken] = q.take("w1", 1, timeout=0)
    assert q.fail("w1", taken, "refused", transient=True, now=T0) == "dead"  # due T0+100
    q.push(a, b)
    for _ in range(2):
        [taken] = q.take("w1", 1, timeout=0)
        assert q.fail("w1", taken, "refused", transient=True, now=T0 + 50) == "dead"
    assert q.revive(now=T0 + 100, bounded=False) == 1  # only the probe is due
    [taken] = q.take("w1", 1, timeout=0)
    assert taken == probe and q.ack("w1", [taken]) == 1  # the dependency is back
    assert q.revive(now=T0 + 101, bounded=False) == 2  # a and b: 49 s early
    assert sorted(bredis.lrange(keys.pending(Q), 0, -1)) == sorted([a, b])
    # Down again: a transient dead-lettering ends the shortcut; schedules rule again.
    [taken, _] = q.take("w1", 2, timeout=0)
    assert q.fail("w1", taken, "refused", transient=True, now=T0 + 102) == "dead"
    assert q.revive(now=T0 + 103, bounded=False) == 0
    assert q.revive(now=T0 + 102 + 200, bounded=False) == 1  # its doubled wait


def test_a_canary_goes_ahead_of_its_schedule_once_per_revive_interval(
    bredis: redis_lib.Redis,
) -> None:
    """Every letter's wait may have doubled to an hour; one letter per revive interval
    still probes, so a dependency that is back is noticed within it."""
    q = RedisQueue(bredis, Q, retry_seconds=0.0, revive_seconds=100.0)
    seconds, micros = bredis.time()
    redis_now = seconds + micros / 1e6
    a, b = message(20), message(21)
    q.push(a, b)
    for _ in range(2):
        [taken] = q.take("w1", 1, timeout=0)
        assert q.fail("w1", taken, "refused", transient=True, now=redis_now) == "dead"
    assert q.revive() == 1  # Redis's clock: neither is due for 100 s; one goes anyway
    assert bredis.llen(keys.pending(Q)) == 1 and q.revivable() == 1
    got: list[int] = []
    wait_for(lambda: got.append(q.revive()) or got[-1] >= 0, 10, 0.05, "the next turn")
    assert got[-1] == 0  # the canary of this interval went already
    assert q.revivable() == 1


def test_revival_is_rate_bounded_per_queue(bredis: redis_lib.Redis) -> None:
    """Two workers call revive as fast as they can: no call revives more than the rate,
    and two calls that revive are a second apart (the turn lives on Redis's clock)."""
    q = RedisQueue(bredis, Q, retry_seconds=0.0, revive_seconds=1.0, revive_rate=10)
    other = RedisQueue(bredis, Q, revive_rate=10)
    raws = [message(100 + i) for i in range(25)]
    q.push(*raws)
    for _ in raws:
        [taken] = q.take("w1", 1, timeout=0)
        assert q.fail("w1", taken, "refused", transient=True, now=T0) == "dead"
    later = T0 + 10**6
    revivals: list[tuple[float, float, int]] = []  # (call start, call end, revived)
    refused = 0
    deadline = time.monotonic() + 60
    while q.revivable() and time.monotonic() < deadline:
        for queue in (q, other):
            start = time.monotonic()
            n = queue.revive(now=later)
            if n >= 0:
                revivals.append((start, time.monotonic(), n))
            else:
                refused += 1
        time.sleep(0.01)
    assert [n for _, _, n in revivals] == [10, 10, 5]
    assert refused > 0
    for (start, _, _), (_, end, _) in zip(revivals, revivals[1:], strict=False):
        assert end - start >= 1.0
    assert bredis.llen(keys.pending(Q)) == 25 and q.dead_letters() == []


def test_an_operators_requeue_discard_or_purge_ends_the_revival(bredis: redis_lib.Redis) -> None:
    q = RedisQueue(bredis, Q, retry_seconds=0.0, revive_seconds=1.0)
    a, b, c = message(7), message(8), message(9)
    q.push(a, b, c)
    for _ in range(3):
        [taken] = q.take("w1", 1, timeout=0)
        q.fail("w1", taken, "refused", transient=True, now=T0)
    letters = {letter.raw: letter for letter in q.dead_letters()}
    assert q.requeue_dead([letters[a]]) == 1  # a fresh start: attempts and budget reset
    assert q.revivable() == 2
    assert bredis.lrem(keys.dead(Q), 1, letters[b].entry) == 1  # the dashboard's discard
    assert q.revive(now=T0 + 100, bounded=False) == 1  # only c; b is forgotten
    assert bredis.lrange(keys.pending(Q), 0, -1) == [a, c]
    assert q.revivable() == 0
    [taken, _] = q.take("w1", 2, timeout=0)
    q.fail("w1", taken, "refused", transient=True, now=T0)
    assert q.purge_dead() == 1
    assert q.revivable() == 0


class FlakySmtp:
    """A handler whose dependency is down while ``down`` is set (RetryableError)."""

    queue = Q
    accepts = frozenset({envelope.ORDER_PLACED})

    def __init__(self) -> None:
        self.down = threading.Event()
        self.down.set()
        self.refused = 0
        self.done: list[str] = []
        self._lock = threading.Lock()

    def handle(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        with self._lock:
            if self.down.is_set():
                self.refused += 1
                raise RetryableError("SMTP 127.0.0.1:1 unavailable: Connection refused")
            self.done.append(event["id"])
        return []


class _NoPublisher:
    def publish(self, event: dict[str, Any]) -> None:
        raise AssertionError("nothing to emit")


def test_a_worker_revives_transient_dead_letters_once_the_dependency_is_back(
    bredis: redis_lib.Redis,
) -> None:
    """Redis's own clock, real worker threads: an outage longer than the budget
    dead-letters the messages; once it is over the housekeeping revives each, and each
    is handled exactly once; no dead letter is left."""
    q = RedisQueue(
        bredis, Q, retry_seconds=1.0, revive_seconds=0.5, backoff_base=0.05, backoff_max=0.2
    )
    raws = [message(200 + i) for i in range(6)]
    q.push(*raws)
    handler = FlakySmtp()
    stop = threading.Event()
    worker = Worker(q, handler, _NoPublisher(), worker_id=f"t-{uuid.uuid4().hex}", stop=stop)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        wait_for(lambda: len(q.dead_letters()) == 6, 60, 0.05, "all dead-lettered, transient")
        assert all(letter.transient for letter in q.dead_letters())
        assert handler.refused > 6  # retried within the budget before giving up
        handler.down.clear()  # the dependency is back
        wait_for(lambda: len(handler.done) == 6, 60, 0.05, "every message handled")
        wait_for(lambda: q.stats()["processed"] == 6, 30, 0.05, "every message acked")
    finally:
        stop.set()
        thread.join(20)
    assert sorted(handler.done) == sorted(json.loads(r)["id"] for r in raws)  # once each
    assert q.dead_letters() == [] and q.revivable() == 0
    stats = q.stats()
    assert stats["revived"] >= 6 and stats["pending"] == stats["delayed"] == 0
