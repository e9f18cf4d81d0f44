"""PATTERN=pubsub for the order pipeline: a worker that takes its events from the channel.

Why it exists: with ``PATTERN=pubsub`` the publisher PUBLISHes every event on
:data:`~messaging.keys.ORDER_EVENTS_CHANNEL` and pushes it to no queue, so a consumer
that only read its queue would never get work. This worker SUBSCRIBEs to the channel
instead and handles the events its handler accepts (``handler.accepts``; the channel
carries every type, the others are ignored). That is pub/sub's guarantee, at most once,
and nothing here hides it: an event published while this worker is stopped, restarting
or cut off from Redis is never seen by it, and its order stops (the order service
lists it as stuck, :mod:`orders.stuck`). Run the same experiment with ``PATTERN=queue``
and the queue keeps those events until the worker is back.

What it keeps from the queue workers, because the pattern changes the delivery, not
the work:

- the same handler, so the effect is still claimed and done once per order and event
  (a reconciliation re-publish or a duplicate finds the stored outcome), and the
  outcome events are still emitted (published on the channel, where the next service
  listens);
- its own queue, drained by an ordinary :class:`~messaging.worker.Worker` thread beside
  the subscription. Once an event has arrived, Redis holds it again whenever this
  worker cannot finish it: a failed event (retryable, permanent or malformed) is pushed
  to the queue, where the usual retries with backoff and dead letters take over; on a
  graceful stop the received but not started events are pushed there too, and handled
  at the next start. A dead letter requeued by the operator lands on that queue as well,
  and so does a backlog left by an earlier run with ``PATTERN=queue`` or ``both``.
  Registration, heartbeat, reaper and ``orders-admin queues``' "workers alive" are that
  worker's.

What is lost, then: what was published while no worker of the queue was subscribed,
and what a SIGKILLed worker had received but not finished (it was only in its memory).
"""

from __future__ import annotations

import json
import logging
import queue as local
import threading
from typing import Any

import redis

from messaging import envelope, keys, metrics, tracing
from messaging.queue import MalformedMessage, parse
from messaging.worker import TAKE_TIMEOUT, Worker

log = logging.getLogger(__name__)

RESUBSCRIBE_DELAY_MAX = 2.0
"""Longest wait between two subscription attempts while Redis is away (seconds)."""


class ChannelWorker(Worker):
    """A :class:`Worker` on its queue plus N threads handling the channel's events.

    Args are :class:`Worker`'s, plus ``channel_concurrency``: threads handling channel
    events (``concurrency`` is the queue side's, one by default: that queue only gets
    failures, requeued dead letters and leftovers).
    """

    def __init__(self, *args: Any, channel_concurrency: int = 1, **kwargs: Any) -> None:
        kwargs.setdefault("concurrency", 1)
        super().__init__(*args, **kwargs)
        self.channel_concurrency = channel_concurrency
        self.channel = keys.ORDER_EVENTS_CHANNEL
        self.received: local.Queue[bytes] = local.Queue()
        self.subscribed = threading.Event()
        """Set while the subscription is confirmed by Redis."""
        self.subscriptions = 0
        """Subscriptions Redis confirmed so far (more than one: it came back after a loss)."""
        self.ignored = 0
        """Channel events of types this handler does not work on."""
        self._channel_threads: list[threading.Thread] = []
        self._processed_lock = threading.Lock()
        self._processed = 0

    # --- the subscription ----------------------------------------------------------

    def _wanted(self, raw: bytes) -> bool:
        """False for an event of a known type this handler does not take (most of them)."""
        try:
            event = json.loads(raw)
        except (ValueError, RecursionError):
            return True  # garbage: handled, so that it is dead-lettered with its reason
        if isinstance(event, dict) and event.get("type") in envelope.EVENT_TYPES:
            return event["type"] in self.handler.accepts
        return True

    def _subscribe(self) -> None:
        """Read the channel into :attr:`received` until stopped; resubscribe after errors."""
        name = self.queue.name
        delay = 0.1
        while not self.stop.is_set() and not self.unhealthy.is_set():
            self._stamp()
            pubsub = self.queue.client.pubsub()
            try:
                pubsub.subscribe(self.channel)
                while not self.stop.is_set() and not self.unhealthy.is_set():
                    self._stamp()
                    message = pubsub.get_message(timeout=TAKE_TIMEOUT)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        self.subscriptions += 1
                        self.subscribed.set()
                        self._recovered()
                        delay = 0.1
                        log.info(
                            "%s: subscribed to %s (PATTERN=pubsub: events published while"
                            " no worker listens are gone)", name, self.channel,
                        )  # fmt: skip
                    elif message["type"] == "message":
                        raw = message["data"]
                        raw = raw if isinstance(raw, bytes) else str(raw).encode()
                        if self._wanted(raw):
                            self.received.put(raw)
                        else:
                            self.ignored += 1
            except (redis.RedisError, OSError) as exc:
                self.subscribed.clear()
                self._outage(exc if isinstance(exc, redis.RedisError) else redis.ConnectionError())
                log.warning(
                    "%s: not subscribed to %s (%s): what is published until it is back"
                    " never reaches this worker", name, self.channel, exc,
                )  # fmt: skip
                self.stop.wait(delay)
                delay = min(delay * 2, RESUBSCRIBE_DELAY_MAX)
            finally:
                self.subscribed.clear()
                try:
                    pubsub.close()
                except (redis.RedisError, OSError):
                    pass

    # --- handling ----------------------------------------------------------------------

    def _hand_to_queue(self, raws: list[bytes]) -> None:
        """Give events back to Redis: the queue side retries or dead-letters them."""
        if raws and not self._retry_redis(lambda: self.queue.push(*raws)):
            log.warning(
                "%s: stopped while Redis was away; %d received event(s) were not kept",
                self.queue.name, len(raws),
            )  # fmt: skip

    def handle_received(self, raw: bytes) -> bool:
        """Handle one channel event; True when done, False when handed to the queue."""
        name = self.queue.name
        try:
            event = parse(raw, self.handler.accepts)
        except MalformedMessage as exc:
            log.warning("%s: malformed event on %s (%s); to the queue", name, self.channel, exc)
            self._hand_to_queue([raw])  # the queue side dead-letters it with the reason
            return False
        order_id = event["data"].get("order_id", "-")
        try:
            # As on the queue: a consumer span, child of the event's trace context.
            with tracing.consumer_span(event, name):
                outcomes = self.handler.handle(event)
                self._emit(outcomes)
        except Exception as exc:  # a retry, a dead letter or Redis away: the queue decides
            metrics.observe_failed(name)
            log.warning(
                "%s: event %s order #%s failed (%s: %s); handed to the queue for retries",
                name, event["id"], order_id, type(exc).__name__, exc,
                extra=self._extra(event, order_id),
            )  # fmt: skip
            self._hand_to_queue([raw])
            return False
        metrics.observe_handled(name, event)
        log.info(
            "%s: handled event %s order #%s from %s%s",
            name, event["id"], order_id, self.channel,
            "".join(f" -> {o['type']}" for o in outcomes),
            extra=self._extra(event, order_id),
        )  # fmt: skip
        return True

    def _count_processed(self, done: int) -> None:
        """Add to the queue's ``processed`` counter (``orders-admin queues``, /metrics)."""
        with self._processed_lock:
            self._processed += done
            pending, self._processed = self._processed, 0
        if not pending:
            return
        try:
            self.queue.client.hincrby(keys.stats(self.queue.name), "processed", pending)
        except redis.RedisError:
            with self._processed_lock:
                self._processed += pending  # counted with the next one

    def _consume_channel(self) -> None:
        """One channel handler thread: handle received events until stopped."""
        while not self.stop.is_set() and not self.unhealthy.is_set():
            self._stamp()
            try:
                raw = self.received.get(timeout=TAKE_TIMEOUT)
            except local.Empty:
                continue
            try:
                if self.handle_received(raw):
                    self.handled += 1
                    self._count_processed(1)
            except Exception:  # a bug in the loop itself: keep the thread alive
                log.exception("%s: unexpected error handling a channel event", self.queue.name)

    # --- the worker ------------------------------------------------------------------

    def health(self) -> str:
        """The queue side's health, and every channel thread alive and not stuck."""
        reason = super().health()
        if reason or self.stop.is_set():
            return reason
        return self._threads_trouble("channel", self._channel_threads)

    def run(self) -> int:
        """Subscribe, handle the channel and the queue until stopped. Returns the exit code."""
        name = self.queue.name
        self._channel_threads = [
            threading.Thread(target=self._subscribe, name=f"{name}-subscriber", daemon=True)
        ] + [
            threading.Thread(target=self._consume_channel, name=f"{name}-channel-{i}", daemon=True)
            for i in range(self.channel_concurrency)
        ]
        for thread in self._channel_threads:
            thread.start()
        # Registered (the heartbeat, "workers alive") only once Redis confirmed the
        # subscription: a worker counted alive is one that hears what is published.
        while not self.subscribed.wait(0.2):
            if self.stop.is_set() or self.unhealthy.is_set():
                break
        code = super().run()
        for thread in self._channel_threads:
            thread.join(5.0)
        left: list[bytes] = []
        while True:
            try:
                left.append(self.received.get_nowait())
            except local.Empty:
                break
        if left:
            log.info("%s: %d received event(s) not started: kept on the queue", name, len(left))
            try:
                self.queue.push(*left)
            except redis.RedisError as exc:
                log.warning("%s: %d received event(s) lost: %s", name, len(left), exc)
        self._count_processed(0)
        return code
