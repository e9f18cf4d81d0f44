"""Publish domain events to Redis: one Lua script per event, so one event is atomic.

Routing (PATTERN decides the paths, the event type the queues): every event is
PUBLISHed to :data:`~messaging.keys.ORDER_EVENTS_CHANNEL` (pubsub, both) and RPUSHed to
``pending(q)`` for exactly the queues :data:`orders.envelope.ROUTES` names for its type
(queue, both). With ``pubsub`` the consumers subscribe to that channel
(:mod:`messaging.channel`); with ``queue`` the channel is only the live feed: the order
service's publisher PUBLISHes its own events there anyway (``feed=True``) and
``orders-updates`` each outcome it records, so the feed shows what the service records.
The order API, the outbox relay and the consumers' outcome events all go through this
one publisher, so the catalogue's table is the only routing there is.

The script runs the PUBLISH and the pushes as one unit: a subscriber never sees an
event that a queue did not get.

On Redis Cluster (REDIS_CLUSTER=1) the queues live in different slots, so no script
can touch them all. There a batch is one RPUSH per queue (all of the batch's events for
that queue, in order: atomic per queue), sent through one cluster pipeline, and only
when every push succeeded the PUBLISHes follow. A failure part way raises: the outbox
keeps the rows unpublished and the relay sends them again, so a queue that already got
them gets a duplicate, which consumers drop by event id. See docs/cluster.md.

REDIS_WAIT_REPLICAS=N adds ``WAIT N`` after the pushes on the same connection, so an
event counts as published (and its outbox row is marked) only once N replicas have it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import redis
from redis.cluster import RedisCluster

from messaging import envelope, keys
from messaging.config import Pattern

WAIT_TIMEOUT_MS = 2000
"""How long a publish waits for REDIS_WAIT_REPLICAS replicas before it counts as failed."""


class ReplicaAckError(redis.RedisError):
    """Fewer replicas than REDIS_WAIT_REPLICAS acknowledged a publish in time."""


PUBLISH_SCRIPT = """
-- ARGV[1]: the event JSON; ARGV[2]: channel to PUBLISH to, or '' for none; ARGV[3]:
-- '1' for an express event. KEYS: the lists to RPUSH the event to; for an express
-- event (pending, express) pairs: it goes to the queue's express list when standard
-- work waits on pending, else to pending (the lane rule of messaging.queue).
if ARGV[2] ~= '' then
  redis.call('PUBLISH', ARGV[2], ARGV[1])
end
if ARGV[3] == '1' then
  for i = 1, #KEYS, 2 do
    if redis.call('LLEN', KEYS[i]) > 0 then
      redis.call('RPUSH', KEYS[i + 1], ARGV[1])
    else
      redis.call('RPUSH', KEYS[i], ARGV[1])
    end
  end
  return #KEYS / 2
end
for i = 1, #KEYS do
  redis.call('RPUSH', KEYS[i], ARGV[1])
end
return #KEYS
"""

PUBLISH_SHA = hashlib.sha1(PUBLISH_SCRIPT.encode()).hexdigest()
"""The name EVALSHA knows :data:`PUBLISH_SCRIPT` by."""

EXPRESS_PUSH_SCRIPT = """
-- Cluster: one queue's express events. KEYS: pending, express. ARGV: the events.
local target = KEYS[1]
if redis.call('LLEN', KEYS[1]) > 0 then target = KEYS[2] end
return redis.call('RPUSH', target, unpack(ARGV))
"""


def route(
    event_type: str, pattern: Pattern, feed: bool = False, express: bool = False
) -> tuple[str, list[str]]:
    """The channel ('' for none) and the list keys an event of this type goes to.

    ``feed``: PUBLISH it whatever PATTERN says (the order service's own events, so the
    live feed is not silent with ``PATTERN=queue``; nobody consumes from it then).
    ``express``: the keys are (pending, express) pairs, one per queue.
    """
    channel = keys.ORDER_EVENTS_CHANNEL if feed or pattern in ("pubsub", "both") else ""
    queues = envelope.queues_for(event_type)  # raises on an unknown type
    if pattern not in ("queue", "both"):
        return channel, []
    if express:
        return channel, [k for q in queues for k in (keys.pending(q), keys.express(q))]
    return channel, [keys.pending(q) for q in queues]


class EventPublisher:
    """Sends events to the order channel and queues per PATTERN, one script call each.

    Args:
        redis_client: a ``redis.Redis``, or a ``RedisCluster`` (then per-queue pushes).
        pattern: PATTERN.
        wait_replicas: REDIS_WAIT_REPLICAS; when > 0 every publish ends with ``WAIT``
            and raises :class:`ReplicaAckError` if fewer replicas acknowledged.
        feed: also PUBLISH with ``PATTERN=queue`` (the order service's publisher: its
            OrderPlaced reach the live feed in every pattern; see :func:`route`).
    """

    def __init__(
        self,
        redis_client: redis.Redis | RedisCluster,
        pattern: Pattern,
        wait_replicas: int = 0,
        feed: bool = False,
    ) -> None:
        self.redis = redis_client
        self.pattern = pattern
        self.wait_replicas = wait_replicas
        self.feed = feed
        self.cluster = isinstance(redis_client, RedisCluster)
        # Cluster: never used (cross-slot); registering would connect a lazy client.
        self._script = (
            None if isinstance(redis_client, RedisCluster) else
            redis_client.register_script(PUBLISH_SCRIPT)
        )  # fmt: skip

    def _args(self, event_type: str, payload: str) -> list[Any]:
        """The script's keys and arguments for one event: ``[numkeys, *keys, *args]``."""
        express = envelope.is_express(payload)
        channel, list_keys = route(event_type, self.pattern, self.feed, express)
        return [len(list_keys), *list_keys, payload, channel, "1" if express else ""]

    def _call(self, event_type: str, payload: str, client: Any) -> Any:
        args = self._args(event_type, payload)
        assert self._script is not None  # single node only
        count = args[0]
        return self._script(keys=args[1 : count + 1], args=args[count + 1 :], client=client)

    def publish(self, event: dict[str, Any]) -> None:
        """Publish one event. Raises redis.RedisError."""
        if self.cluster or self.wait_replicas:
            self.publish_serialized([(event["type"], envelope.dumps(event))])
            return
        self._call(event["type"], envelope.dumps(event), self.redis)

    def publish_many(self, batch: Iterable[dict[str, Any]]) -> None:
        """Publish events in order through one pipeline. Raises redis.RedisError."""
        self.publish_serialized((event["type"], envelope.dumps(event)) for event in batch)

    def publish_serialized(self, batch: Iterable[tuple[str, str]]) -> None:
        """Publish ``(type, JSON text)`` pairs in order through one pipeline.

        The pipeline is not a transaction: after an error some events may have gone out,
        which the outbox turns into a duplicate on retry, never a loss.
        """
        if self.cluster:
            self._publish_cluster(list(batch))
            return
        calls = [self._args(event_type, payload) for event_type, payload in batch]
        if not calls:
            return
        results = self._pipeline(calls, raise_on_error=False)
        errors = [r for r in results if isinstance(r, redis.RedisError)]
        missing = [
            call for call, r in zip(calls, results, strict=False)
            if isinstance(r, redis.exceptions.NoScriptError)
        ]  # fmt: skip
        if len(missing) < len(errors):
            raise next(e for e in errors if not isinstance(e, redis.exceptions.NoScriptError))
        if missing:  # a restarted or flushed server: load the script, send what failed
            self.redis.execute_command("SCRIPT LOAD", PUBLISH_SCRIPT)
            self._pipeline(missing, raise_on_error=True)

    def _pipeline(self, calls: list[list[Any]], raise_on_error: bool) -> list[Any]:
        """EVALSHA each call in one pipeline (+ WAIT); the scripts' results (or errors).

        redis-py's pipeline asks SCRIPT EXISTS before every execute that holds a script
        object: a second round trip per batch. EVALSHA alone is one; a NOSCRIPT answer
        (an event that did nothing) is retried by :meth:`publish_serialized` once the
        script is loaded. Only those: an event is never sent twice here.
        """
        with self.redis.pipeline(transaction=False) as pipe:
            for call in calls:
                pipe.execute_command("EVALSHA", PUBLISH_SHA, *call)
            if self.wait_replicas:
                # Same connection as the scripts: WAIT counts exactly their writes.
                pipe.execute_command("WAIT", self.wait_replicas, WAIT_TIMEOUT_MS)
            results = pipe.execute(raise_on_error=raise_on_error)
        if self.wait_replicas:
            if isinstance(results[-1], Exception):
                raise results[-1]  # no answer from WAIT: not published as far as we know
            self._check_wait(results[-1:])
            results = results[:-1]
        return list(results)

    def _publish_cluster(self, batch: list[tuple[str, str]]) -> None:
        """Cluster: one RPUSH per queue (+ WAIT on its node), then the PUBLISHes."""
        # key -> payloads; an express event's key is "pending|express" (both one slot).
        pushes: dict[tuple[str, ...], list[str]] = {}
        published: list[tuple[str, str]] = []
        for event_type, payload in batch:
            fast = envelope.is_express(payload)
            channel, list_keys = route(event_type, self.pattern, self.feed, fast)
            if fast:
                for pair in zip(list_keys[::2], list_keys[1::2], strict=True):
                    pushes.setdefault(pair, []).append(payload)
            else:
                for key in list_keys:
                    pushes.setdefault((key,), []).append(payload)
            if channel:
                published.append((channel, payload))
        if pushes:
            cluster: RedisCluster = self.redis  # type: ignore[assignment]
            with cluster.pipeline(transaction=False) as pipe:
                for lists, payloads in pushes.items():
                    if len(lists) == 1:
                        pipe.rpush(lists[0], *payloads)
                    else:  # express: the lane rule, one script on the queue's slot
                        pipe.execute_command("EVAL", EXPRESS_PUSH_SCRIPT, 2, *lists, *payloads)
                    if self.wait_replicas:
                        # Routed to the key's node: the pipeline sends both on one connection.
                        pipe.execute_command(
                            "WAIT", self.wait_replicas, WAIT_TIMEOUT_MS,
                            target_nodes=cluster.get_node_from_key(lists[0]),
                        )  # fmt: skip
                results = pipe.execute()
            self._check_wait(results[1::2] if self.wait_replicas else [])
        # Only after every queue has the events: a subscriber never sees one a queue lacks.
        for channel, payload in published:
            self.redis.publish(channel, payload)

    def _check_wait(self, acks: list[Any]) -> None:
        for acked in acks:
            if int(acked) < self.wait_replicas:
                raise ReplicaAckError(
                    f"{acked} of {self.wait_replicas} replica(s) acknowledged within "
                    f"{WAIT_TIMEOUT_MS} ms (REDIS_WAIT_REPLICAS)"
                )
