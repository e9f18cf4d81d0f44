"""The worker runtime: N handler threads on one queue, heartbeat, reaper, promoter.

One process is one worker id (``hostname-pid-xxxxxxxx``) with one processing list,
shared by its threads. Each thread loops: take a batch (one round trip), handle each
message, ack the handled ones together (one round trip). A failure is settled at once
(retry or dead letter, one Lua call). A housekeeping thread refreshes the heartbeat,
promotes due retries, revives due transient dead letters (messaging.queue's retry
budgets) and reaps dead workers, every half second.

Order matters at the end of a message: the handler commits its effect, the outcome
event is emitted, and only then is the message acked. A crash anywhere before the ack
redelivers it; the handler finds its stored outcome and re-emits that (same event id,
which the recorder dedupes). Nothing is lost; no effect happens twice.

Shutdown (RQ/Dramatiq style): the first SIGTERM/SIGINT lets every thread finish its
current message, acks what was done, puts the batch's un-started messages back at the
head of pending, deregisters and exits 0. A second signal exits at once (``os._exit``);
the reaper returns whatever it held once its heartbeat expires.

Redis going away mid-run is survived: the thread logs once, keeps what it holds, backs
off and retries; once Redis answers again it acks what it finished and releases the
rest. That holds for every Redis error, not only lost connections: a failover turns
the old primary into a replica that answers ``READONLY`` to every write, and a thread
that let that error escape would die with its batch while the process heartbeats on.

Liveness (the "alive but not consuming" check): every handler thread stamps its
progress each time round its loop. The housekeeping thread heartbeats only while every
handler thread is alive and none has been inside one message for longer than
CONSUMER_STUCK_SECONDS; otherwise it drops the heartbeat at once (the reaper returns
the messages to other workers), sets ``consumer_healthy`` to 0 and the process exits
with :data:`EXIT_UNHEALTHY`, so a supervisor restarts it.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import redis

from messaging import envelope, faults, metrics, tracing
from messaging.config import EXIT_OK
from messaging.handler import Handler
from messaging.queue import MalformedMessage, RedisQueue, classify, parse

log = logging.getLogger(__name__)

TAKE_TIMEOUT = 1.0
"""Seconds a thread blocks waiting for work before it checks the stop flag again."""
HOUSEKEEPING_INTERVAL = 0.5
"""Seconds between heartbeat/promote/reap rounds (capped at a quarter of the TTL)."""
ORPHAN_SWEEP_INTERVAL = 5.0
"""Seconds between two looks for messages in our processing list that no thread holds."""
EXIT_UNHEALTHY = 3
"""A handler thread died or got stuck: the process gave up its work and exits."""
DEFAULT_STUCK_SECONDS = 300.0
"""Seconds one message may keep a handler thread before the worker counts as stuck."""
REDIS_ERRORS = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.BusyLoadingError,
    # Redis Cluster during a failover: slots briefly unserved, or retries exhausted.
    redis.exceptions.ClusterError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.SlotNotCoveredError,
)
"""Errors that mean "Redis is not there right now": back off and try again.

Any other :class:`redis.RedisError` (``READONLY`` from a demoted primary, ``OOM``, a
script error) is survived the same way, with its own log line: see ``_retry_redis``."""


class Publisher(Protocol):
    """Emits outcome events (messaging.publisher.EventPublisher)."""

    def publish(self, event: dict[str, Any]) -> None:
        """Publish one event atomically."""


def new_worker_id() -> str:
    """hostname-pid-8 hex digits: unique per process, readable in logs."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Worker:
    """Runs a handler on a queue with N threads until ``stop`` is set.

    Args:
        queue: the reliable queue.
        handler: the consumer's work (idempotent by event id).
        publisher: emits the handler's outcome events before the ack.
        concurrency: handler threads.
        batch_size: messages taken and acked per round trip, per thread.
        heartbeat_ttl: seconds; a worker silent for this long is reaped.
        worker_id: defaults to :func:`new_worker_id`.
        stop: set it to stop gracefully.
        stuck_seconds: one message holding a thread this long makes the worker unhealthy.
    """

    def __init__(
        self,
        queue: RedisQueue,
        handler: Handler,
        publisher: Publisher,
        *,
        concurrency: int = 1,
        batch_size: int = 10,
        heartbeat_ttl: int = 10,
        worker_id: str | None = None,
        stop: threading.Event | None = None,
        stuck_seconds: float = DEFAULT_STUCK_SECONDS,
    ) -> None:
        self.queue = queue
        self.handler = handler
        self.publisher = publisher
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.heartbeat_ttl = heartbeat_ttl
        self.id = worker_id or new_worker_id()
        self.stop = stop or threading.Event()
        self._down_lock = threading.Lock()
        self._redis_down = False
        # Messages some thread holds (taken, not yet acked or released). A take whose
        # reply is lost in a Redis blip leaves messages in our processing list that no
        # thread holds; the housekeeping thread returns those to pending.
        self._held: collections.Counter[bytes] = collections.Counter()
        self._held_lock = threading.Lock()
        self._sweep_orphans = threading.Event()
        self.handled = 0
        self.stuck_seconds = stuck_seconds
        # Liveness: thread name -> time.monotonic() of its last progress.
        self._progress: dict[str, float] = {}
        self._consumers: list[threading.Thread] = []
        self.unhealthy = threading.Event()
        """Set when a handler thread died or got stuck (the process then exits 3)."""
        self.unhealthy_reason = ""

    # --- Redis outages: log once, back off --------------------------------------

    def _outage(self, exc: Exception) -> None:
        with self._down_lock:
            if not self._redis_down:
                self._redis_down = True
                if isinstance(exc, REDIS_ERRORS):
                    log.warning("%s: lost Redis (%s); retrying", self.queue.name, exc)
                else:  # READONLY after a failover, OOM, ...: the same call may pass later
                    log.warning(
                        "%s: Redis refused (%s: %s); retrying",
                        self.queue.name, type(exc).__name__, exc,
                    )  # fmt: skip

    def _recovered(self) -> None:
        if self._redis_down:
            with self._down_lock:
                if self._redis_down:
                    self._redis_down = False
                    log.info("%s: Redis is back", self.queue.name)

    def _retry_redis(self, action: Callable[[], Any]) -> bool:
        """Run ``action`` until Redis answers (True) or we are stopped (False).

        Every Redis error is retried with capped exponential backoff, not only lost
        connections: ``READONLY`` lasts until the failover has promoted a new primary
        (or the client has reconnected to it), and then the same call succeeds.
        """
        delay = 0.1
        while True:
            self._stamp()
            try:
                action()
            except redis.RedisError as exc:
                self._outage(exc)
                if self.stop.wait(delay):
                    return False
                delay = min(delay * 2, 2.0)
            else:
                self._recovered()
                return True

    # --- liveness ---------------------------------------------------------------------

    def _stamp(self) -> None:
        """Record that the calling handler thread is making progress."""
        self._progress[threading.current_thread().name] = time.monotonic()

    def health(self) -> str:
        """'' while every handler thread is alive and none is stuck, else the reason."""
        return self._threads_trouble("handler", self._consumers, " in one message")

    def _threads_trouble(
        self, kind: str, threads: Iterable[threading.Thread], stuck_in: str = ""
    ) -> str:
        """Why one of ``threads`` is unhealthy: it died (while we are not stopping), or
        its last :meth:`_stamp` is older than CONSUMER_STUCK_SECONDS; '' when none is."""
        now = time.monotonic()
        for thread in threads:
            if not thread.is_alive() and not self.stop.is_set():
                return f"{kind} thread {thread.name} died"
            since = self._progress.get(thread.name)
            if since is not None and now - since > self.stuck_seconds:
                return (
                    f"{kind} thread {thread.name} stuck{stuck_in} for {now - since:.0f} s"
                    f" (CONSUMER_STUCK_SECONDS {self.stuck_seconds:g})"
                )
        return ""

    def _give_up(self, reason: str) -> None:
        """Stop heartbeating and drop the heartbeat, so the reaper frees our messages now."""
        self.unhealthy_reason = reason
        metrics.set_healthy(self.queue.name, False)
        log.error(
            "%s: worker %s unhealthy: %s; dropping its heartbeat so its messages return,"
            " exiting %d", self.queue.name, self.id, reason, EXIT_UNHEALTHY,
        )  # fmt: skip
        try:
            self.queue.drop_heartbeat(self.id)
        except redis.RedisError as exc:  # it expires within the TTL anyway
            log.warning("%s: could not drop the heartbeat (%s); it expires", self.queue.name, exc)
        self.unhealthy.set()  # last: the main thread returns as soon as it sees it

    # --- one message ---------------------------------------------------------------

    def handle_one(self, raw: bytes) -> bool:
        """Handle one message; True when it should be acked.

        Failures are settled here (retry or dead letter). Redis errors propagate: the
        caller keeps the message and settles it once Redis is back.
        """
        name = self.queue.name
        try:
            event = parse(raw, self.handler.accepts)
        except MalformedMessage as exc:
            self.queue.fail(self.id, raw, str(exc), permanent=True)
            log.warning("%s: dead-lettered a malformed message: %s", name, exc)
            return False
        order_id = event["data"].get("order_id", "-")
        # The outcome events built inside carry this span's context (messaging.tracing).
        with tracing.consumer_span(event, name) as span:
            try:
                outcomes = self.handler.handle(event)
            except redis.RedisError:  # our Redis, not the message: keep it, settle later
                raise
            except Exception as exc:
                self._failed(raw, event, exc, span)
                return False
            envelope.inherit_priority(outcomes, event)
            self._emit(outcomes)
            metrics.observe_handled(name, event)
            log.info(
                "%s: handled event %s order #%s%s",
                name, event["id"], order_id,
                "".join(f" -> {o['type']}" for o in outcomes),
                extra=self._extra(event, order_id, span),
            )  # fmt: skip
        return True

    def _failed(self, raw: bytes, event: dict[str, Any], exc: Exception, span: Any) -> None:
        """Settle one message whose handling raised ``exc``: retry or dead letter."""
        name = self.queue.name
        order_id = event["data"].get("order_id", "-")
        verdict = classify(exc)
        error = f"{type(exc).__name__}: {exc}"
        if span is not None and span.is_recording():  # a batch's spans are marked inside
            tracing.set_error(span, error)
        result = self.queue.fail(
            self.id,
            raw,
            error,
            permanent=verdict == "dead",
            transient=verdict == "transient",
        )
        metrics.observe_failed(name)
        log.warning(
            "%s: event %s order #%s failed (%s), %s",
            name, event["id"], order_id, error, result,
            extra=self._extra(event, order_id, span),
        )  # fmt: skip

    def _emit(self, outcomes: list[dict[str, Any]]) -> None:
        """Publish committed outcomes, in order: one pipeline when the publisher has it."""
        faults.hit("worker.after_commit")
        publish_many = getattr(self.publisher, "publish_many", None)
        if len(outcomes) > 1 and publish_many is not None:
            publish_many(outcomes)
        else:
            for outcome in outcomes:
                self.publisher.publish(outcome)
        faults.hit("worker.after_emit")

    def handle_batch(self, raws: list[bytes]) -> tuple[list[bytes], list[bytes]]:
        """Handle a taken batch with one ``handle_batch`` call; (raws to ack, un-started).

        Same order as :meth:`handle_one`, batch-wide: the handler commits every effect
        of the batch in one transaction, then the outcomes go out in one pipeline, then
        (in the caller) one ack. A crash between any two steps redelivers the batch,
        whose events then find their stored outcomes: the windows are those of one
        message, not wider. What the batch did not do (malformed, bad data, a failed
        send, or the whole batch when the handler raised and so committed nothing)
        goes through :meth:`handle_one`, which settles failures one by one. An event
        the handler tried and failed (an exception in its place: a send refused, a
        gateway timeout) is settled as that failure at once, without a second try.

        Shutdown: the handler gets ``stopping`` and starts no further event once it is
        true (it returns None for those); those, and what would have been handled
        alone, come back un-started, for the caller to put back at the head of pending.
        """
        name = self.queue.name
        batch_handler: Any = self.handler
        parsed: list[tuple[bytes, dict[str, Any]]] = []
        alone: list[bytes] = []
        for raw in raws:
            try:
                parsed.append((raw, parse(raw, self.handler.accepts)))
            except MalformedMessage:
                alone.append(raw)  # handle_one dead-letters it with the reason
        results: list[list[dict[str, Any]] | Exception | None] = []
        spans: list[Any] = []
        if parsed:
            events = [event for _, event in parsed]
            # One span per message; each order's outcomes carry its message's span.
            with tracing.batch_spans(events, name) as spans:
                try:
                    results = batch_handler.handle_batch(events, stopping=self.stop.is_set)
                except redis.RedisError:  # our Redis, not the messages: keep them, settle later
                    raise
                except Exception as exc:  # nothing committed: one at a time settles each
                    log.info("%s: batch of %d failed (%s); one at a time", name, len(parsed), exc)
                    results = [None] * len(parsed)
                for span, outs in zip(spans, results, strict=False):
                    if isinstance(outs, Exception):
                        tracing.set_error(span, f"{type(outs).__name__}: {outs}")
        span_of = {id(event): span for (_, event), span in zip(parsed, spans, strict=False)}
        done_events: list[tuple[bytes, dict[str, Any], list[dict[str, Any]]]] = []
        failures: list[tuple[bytes, dict[str, Any], Exception]] = []
        for (raw, event), outs in zip(parsed, results, strict=True):
            if outs is None:
                alone.append(raw)
            elif isinstance(outs, Exception):
                failures.append((raw, event, outs))
            else:
                done_events.append((raw, event, outs))
        done: list[bytes] = []
        if done_events:
            for _, event, outs in done_events:
                envelope.inherit_priority(outs, event)
            self._emit([o for _, _, outs in done_events for o in outs])
            for raw, event, outs in done_events:
                order_id = event["data"].get("order_id", "-")
                metrics.observe_handled(name, event)
                log.info(
                    "%s: handled event %s order #%s%s",
                    name, event["id"], order_id, "".join(f" -> {o['type']}" for o in outs),
                    extra=self._extra(event, order_id, span_of.get(id(event))),
                )  # fmt: skip
                done.append(raw)
        for raw, event, error in failures:
            self._failed(raw, event, error, span_of.get(id(event)))
        for n, raw in enumerate(alone):
            if self.stop.is_set():
                return done, alone[n:]
            if self.handle_one(raw):
                done.append(raw)
        return done, []

    def _extra(self, event: dict[str, Any], order_id: Any, span: Any = None) -> dict[str, Any]:
        """Fields of the JSON log line (LOG_FORMAT=json) for one event."""
        extra = {
            "event_id": event["id"],
            "order_id": order_id,
            "event_type": event["type"],
            "queue": self.queue.name,
            "worker": self.id,
        }
        trace_id = tracing.trace_id_of(span) if span is not None else ""
        if trace_id:
            extra["trace_id"] = trace_id
        return extra

    # --- threads -------------------------------------------------------------------

    def _consume(self) -> None:
        """One handler thread: take a batch, handle it, ack it; until stopped.

        The ack of a handled batch travels with the next take (one Lua call,
        :meth:`RedisQueue.take`'s ``ack``), which follows at once: a message taken
        alone as it arrives costs one round trip fewer. When there is no next take
        (stopping, un-started messages to put back), the ack goes alone, as before.
        """
        done: list[bytes] = []
        todo: list[bytes] = []
        handled: list[bytes] = []  # to ack with the next take
        while True:
            self._stamp()
            if handled and (self.stop.is_set() or self.unhealthy.is_set()):
                done += handled  # no next take: acked alone below
                handled.clear()
            if done or todo:  # left over from a Redis outage: settle first
                if not self._retry_redis(functools.partial(self._settle, done, todo)):
                    return  # stopped while Redis is away: the reaper will return them
            if self.stop.is_set() or self.unhealthy.is_set():
                return
            try:
                if handled:
                    self._before_ack()
                todo = self.queue.take(self.id, self.batch_size, TAKE_TIMEOUT, ack=handled)
                with self._held_lock:
                    self._held.subtract(handled)
                    self._held.update(todo)
                handled.clear()
                faults.hit("worker.after_take")
                self._recovered()
                if len(todo) > 1 and hasattr(self.handler, "handle_batch"):
                    if not self.stop.is_set():
                        self._stamp()
                        handled, todo = self.handle_batch(todo)
                        done += handled
                        self.handled += len(handled)
                while todo:
                    if self.stop.is_set():
                        break  # the rest goes back to pending in _settle
                    self._stamp()
                    if self.handle_one(todo[0]):
                        done.append(todo[0])
                        self.handled += 1
                    todo.pop(0)
                if todo or self.stop.is_set():
                    self._settle(done, todo)
                else:  # acked by the next take, in its round trip
                    handled += done
                    done.clear()
            except redis.RedisError as exc:  # READONLY too: kept, settled once it passes
                done += handled  # the take with their ack failed: acked (again) alone
                handled.clear()
                self._outage(exc)
                self._sweep_orphans.set()
                self.stop.wait(0.1)
            except Exception:  # a bug in the loop itself: keep the thread alive
                done += handled
                handled.clear()
                log.exception("%s: unexpected error in worker loop", self.queue.name)
                self.stop.wait(1.0)

    @staticmethod
    def _before_ack() -> None:
        """The fault point before an ack (alone, or with the next take)."""
        faults.hit("worker.before_ack")

    def _settle(self, done: list[bytes], todo: list[bytes]) -> None:
        """Ack the handled, release the un-started; clears both lists when it succeeds."""
        if done:
            self._before_ack()
            self.queue.ack(self.id, done)
            with self._held_lock:
                self._held.subtract(done)
            done.clear()
        if todo:
            self.queue.release(self.id, todo)
            with self._held_lock:
                self._held.subtract(todo)
            todo.clear()

    def _release_orphans(self) -> None:
        """Return to pending what sits in our processing list but no thread holds.

        A message whose take is in flight at this instant may be returned too: it is
        then delivered twice, which the handlers' event-id check absorbs. Never lost.
        """
        in_list = collections.Counter(self.queue.in_flight(self.id))
        with self._held_lock:
            orphans = in_list - +self._held
        if orphans:
            moved = self.queue.release(self.id, list(orphans.elements()))
            # 0: a reaper returned them first (our heartbeat lapsed in the outage).
            log.log(
                logging.WARNING if moved else logging.INFO,
                "%s: returned %d message(s) whose take was cut off by a Redis outage",
                self.queue.name, moved,
            )  # fmt: skip

    def _sweep_unheld(self, suspects: collections.Counter[bytes]) -> collections.Counter[bytes]:
        """Release what no thread held at this sweep *and* at the previous one.

        Run every ORPHAN_SWEEP_INTERVAL even without a Redis error: a Redis that lost
        its AOF tail (power loss) or failed over to a lagging replica can bring back
        messages this worker had already acked; they reappear in its processing list,
        held by no thread, and no reaper frees them while it heartbeats. Seen twice
        (a sweep interval apart, far longer than a take's round trip), a message is not
        a take in flight but an orphan. Returns this sweep's unheld messages.
        """
        in_list = collections.Counter(self.queue.in_flight(self.id))
        with self._held_lock:
            unheld = in_list - +self._held
        orphans = unheld & suspects
        if orphans:
            moved = self.queue.release(self.id, list(orphans.elements()))
            log.warning(
                "%s: returned %d message(s) that sat in our processing list unheld",
                self.queue.name, moved,
            )  # fmt: skip
            return unheld - orphans
        return unheld

    def _housekeeping(self) -> None:
        """Heartbeat, promote due retries, reap dead workers; until stopped."""
        interval = min(HOUSEKEEPING_INTERVAL, self.heartbeat_ttl / 4)
        unheld: collections.Counter[bytes] = collections.Counter()
        next_sweep = time.monotonic() + ORPHAN_SWEEP_INTERVAL
        while not self.stop.wait(interval):
            reason = self.health()
            if reason:
                self._give_up(reason)
                return
            try:
                if not self.queue.heartbeat(self.id, self.heartbeat_ttl):
                    log.warning(
                        "%s: worker %s had been reaped (heartbeat expired); re-registered",
                        self.queue.name, self.id,
                    )  # fmt: skip
                self.queue.promote()
                revived = self.queue.revive()
                if revived > 0:
                    log.warning(
                        "%s: revived %d dead letter(s) of a transient cause",
                        self.queue.name, revived,
                    )  # fmt: skip
                self.queue.reap()
                if self._sweep_orphans.is_set():
                    self._release_orphans()
                    self._sweep_orphans.clear()  # only once it succeeded
                if time.monotonic() >= next_sweep:
                    unheld = self._sweep_unheld(unheld)
                    next_sweep = time.monotonic() + ORPHAN_SWEEP_INTERVAL
                self._recovered()
            except redis.RedisError as exc:  # logged once per outage, READONLY included
                self._outage(exc)
            except Exception:  # a bug here must not end the heartbeat while threads work
                log.exception("%s: housekeeping failed", self.queue.name)

    def run(self) -> int:
        """Register, run the threads until stopped, deregister. Returns the exit code."""
        name = self.queue.name
        self._retry_redis(lambda: self.queue.heartbeat(self.id, self.heartbeat_ttl))
        log.info(
            "%s: worker %s started (%d thread(s), batch %d)",
            name, self.id, self.concurrency, self.batch_size,
        )  # fmt: skip
        housekeeping = threading.Thread(target=self._housekeeping, name="housekeeping", daemon=True)
        self._consumers = [
            threading.Thread(target=self._consume, name=f"{name}-{i}", daemon=True)
            for i in range(self.concurrency)
        ]
        metrics.set_healthy(name, True)
        for thread in [housekeeping, *self._consumers]:
            thread.start()
        # The main thread only waits, so signal handlers run promptly.
        for thread in [housekeeping, *self._consumers]:
            while thread.is_alive():
                if self.unhealthy.is_set():
                    # A stuck thread never returns; the daemon threads end with us.
                    return EXIT_UNHEALTHY
                if not housekeeping.is_alive() and not self.stop.is_set():
                    self._give_up("the housekeeping thread died")
                    return EXIT_UNHEALTHY
                thread.join(0.5)
        if self.unhealthy.is_set():
            return EXIT_UNHEALTHY
        try:
            forgotten = self.queue.deregister(self.id)
        except redis.RedisError as exc:
            log.warning("%s: could not deregister (%s); the reaper will", name, exc)
        else:
            if not forgotten:
                log.warning("%s: messages left in processing; the reaper will return them", name)
        log.info("%s: worker %s stopped after %d event(s)", name, self.id, self.handled)
        return EXIT_OK
