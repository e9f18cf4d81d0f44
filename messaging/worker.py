"""The worker runtime: N handler threads on one queue, heartbeat, reaper, promoter.

One process is one worker id (``hostname-pid-xxxxxxxx``) with one processing list,
shared by its threads. Each thread loops: take a batch (one round trip), handle each
message, ack the handled ones together (one round trip). A failure is settled at once
(retry or dead letter, one Lua call). A housekeeping thread refreshes the heartbeat,
promotes due retries and reaps dead workers, every half second.

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
rest.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from typing import Any, Protocol

import redis

from messaging import metrics
from messaging.config import EXIT_OK
from messaging.handler import Handler
from messaging.queue import MalformedMessage, RedisQueue, classify, parse

log = logging.getLogger(__name__)

TAKE_TIMEOUT = 1.0
"""Seconds a thread blocks waiting for work before it checks the stop flag again."""
HOUSEKEEPING_INTERVAL = 0.5
"""Seconds between heartbeat/promote/reap rounds (capped at a quarter of the TTL)."""
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
"""Errors that mean "Redis is not there right now": back off and try again."""


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

    # --- Redis outages: log once, back off --------------------------------------

    def _outage(self, exc: Exception) -> None:
        with self._down_lock:
            if not self._redis_down:
                self._redis_down = True
                log.warning("%s: lost Redis (%s); retrying", self.queue.name, exc)

    def _recovered(self) -> None:
        if self._redis_down:
            with self._down_lock:
                if self._redis_down:
                    self._redis_down = False
                    log.info("%s: Redis is back", self.queue.name)

    def _retry_redis(self, action: Callable[[], Any]) -> bool:
        """Run ``action`` until Redis answers (True) or we are stopped (False)."""
        delay = 0.1
        while True:
            try:
                action()
            except REDIS_ERRORS as exc:
                self._outage(exc)
                if self.stop.wait(delay):
                    return False
                delay = min(delay * 2, 2.0)
            else:
                self._recovered()
                return True

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
        try:
            outcomes = self.handler.handle(event)
        except REDIS_ERRORS:
            raise
        except Exception as exc:
            verdict = classify(exc)
            error = f"{type(exc).__name__}: {exc}"
            result = self.queue.fail(self.id, raw, error, permanent=verdict == "dead")
            metrics.observe_failed(name)
            log.warning(
                "%s: event %s order #%s failed (%s), %s",
                name, event["id"], order_id, error, result,
                extra=self._extra(event, order_id),
            )  # fmt: skip
            return False
        for outcome in outcomes:
            self.publisher.publish(outcome)
        metrics.observe_handled(name, event)
        log.info(
            "%s: handled event %s order #%s%s",
            name, event["id"], order_id,
            "".join(f" -> {o['type']}" for o in outcomes),
            extra=self._extra(event, order_id),
        )  # fmt: skip
        return True

    def _extra(self, event: dict[str, Any], order_id: Any) -> dict[str, Any]:
        """Fields of the JSON log line (LOG_FORMAT=json) for one event."""
        return {
            "event_id": event["id"],
            "order_id": order_id,
            "event_type": event["type"],
            "queue": self.queue.name,
            "worker": self.id,
        }

    # --- threads -------------------------------------------------------------------

    def _consume(self) -> None:
        """One handler thread: take a batch, handle it, ack it; until stopped."""
        done: list[bytes] = []
        todo: list[bytes] = []
        while True:
            if done or todo:  # left over from a Redis outage: settle first
                if not self._retry_redis(functools.partial(self._settle, done, todo)):
                    return  # stopped while Redis is away: the reaper will return them
            if self.stop.is_set():
                return
            try:
                todo = self.queue.take(self.id, self.batch_size, TAKE_TIMEOUT)
                with self._held_lock:
                    self._held.update(todo)
                self._recovered()
                while todo:
                    if self.stop.is_set():
                        break  # the rest goes back to pending in _settle
                    if self.handle_one(todo[0]):
                        done.append(todo[0])
                        self.handled += 1
                    todo.pop(0)
                self._settle(done, todo)
            except REDIS_ERRORS as exc:
                self._outage(exc)
                self._sweep_orphans.set()
                self.stop.wait(0.1)
            except Exception:  # a bug in the loop itself: keep the thread alive
                log.exception("%s: unexpected error in worker loop", self.queue.name)
                self.stop.wait(1.0)

    def _settle(self, done: list[bytes], todo: list[bytes]) -> None:
        """Ack the handled, release the un-started; clears both lists when it succeeds."""
        if done:
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
            log.warning(
                "%s: returned %d message(s) whose take was cut off by a Redis outage",
                self.queue.name, moved,
            )  # fmt: skip

    def _housekeeping(self) -> None:
        """Heartbeat, promote due retries, reap dead workers; until stopped."""
        interval = min(HOUSEKEEPING_INTERVAL, self.heartbeat_ttl / 4)
        while not self.stop.wait(interval):
            try:
                if not self.queue.heartbeat(self.id, self.heartbeat_ttl):
                    log.warning(
                        "%s: worker %s had been reaped (heartbeat expired); re-registered",
                        self.queue.name, self.id,
                    )  # fmt: skip
                self.queue.promote()
                self.queue.reap()
                if self._sweep_orphans.is_set():
                    self._release_orphans()
                    self._sweep_orphans.clear()  # only once it succeeded
                self._recovered()
            except REDIS_ERRORS as exc:
                self._outage(exc)
            except redis.RedisError:
                log.exception("%s: housekeeping failed", self.queue.name)

    def run(self) -> int:
        """Register, run the threads until stopped, deregister. Returns the exit code."""
        name = self.queue.name
        self._retry_redis(lambda: self.queue.heartbeat(self.id, self.heartbeat_ttl))
        log.info(
            "%s: worker %s started (%d thread(s), batch %d)",
            name, self.id, self.concurrency, self.batch_size,
        )  # fmt: skip
        threads = [threading.Thread(target=self._housekeeping, name="housekeeping", daemon=True)]
        threads += [
            threading.Thread(target=self._consume, name=f"{name}-{i}", daemon=True)
            for i in range(self.concurrency)
        ]
        for thread in threads:
            thread.start()
        # The main thread only waits, so signal handlers run promptly.
        for thread in threads:
            while thread.is_alive():
                thread.join(0.5)
        try:
            forgotten = self.queue.deregister(self.id)
        except redis.RedisError as exc:
            log.warning("%s: could not deregister (%s); the reaper will", name, exc)
        else:
            if not forgotten:
                log.warning("%s: messages left in processing; the reaper will return them", name)
        log.info("%s: worker %s stopped after %d event(s)", name, self.id, self.handled)
        return EXIT_OK
