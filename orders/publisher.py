"""Publish domain events to Redis: one Lua script per event, so one event is atomic.

Routing (PATTERN decides the paths, the event type the queues):

- ``OrderPlaced``: PUBLISH to :data:`~orders.keys.ORDER_EVENTS_CHANNEL` (pubsub, both)
  and RPUSH to ``pending(q)`` for every q in :data:`~orders.keys.CONSUMER_QUEUES`
  (queue, both);
- every other type (the outcomes): PUBLISH to the same channel (pubsub, both) and RPUSH
  to ``pending(ORDER_UPDATES_QUEUE)`` (queue, both).

The script runs the PUBLISH and the pushes as one unit: a subscriber never sees an
event that a queue did not get. It is not cluster-safe across queues (each queue has its
own hash tag); on Redis Cluster publish per queue instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import redis

from orders import events, keys
from orders.config import Pattern

PUBLISH_SCRIPT = """
-- ARGV[1]: the event JSON; ARGV[2]: channel to PUBLISH to, or '' for none.
-- KEYS: the lists to RPUSH the event to. Returns the number of pushes.
if ARGV[2] ~= '' then
  redis.call('PUBLISH', ARGV[2], ARGV[1])
end
for i = 1, #KEYS do
  redis.call('RPUSH', KEYS[i], ARGV[1])
end
return #KEYS
"""


def route(event_type: str, pattern: Pattern) -> tuple[str, list[str]]:
    """The channel ('' for none) and the list keys an event of this type goes to."""
    channel = keys.ORDER_EVENTS_CHANNEL if pattern in ("pubsub", "both") else ""
    if pattern not in ("queue", "both"):
        return channel, []
    if event_type == events.ORDER_PLACED:
        return channel, [keys.pending(q) for q in keys.CONSUMER_QUEUES]
    return channel, [keys.pending(keys.ORDER_UPDATES_QUEUE)]


class EventPublisher:
    """Sends events to the order channel and queues per PATTERN, one script call each."""

    def __init__(self, redis_client: redis.Redis, pattern: Pattern) -> None:
        self.redis = redis_client
        self.pattern = pattern
        self._script = redis_client.register_script(PUBLISH_SCRIPT)

    def _call(self, event_type: str, payload: str, client: Any) -> Any:
        channel, list_keys = route(event_type, self.pattern)
        return self._script(keys=list_keys, args=[payload, channel], client=client)

    def publish(self, event: dict[str, Any]) -> None:
        """Publish one event. Raises redis.RedisError."""
        self._call(event["type"], events.dumps(event), self.redis)

    def publish_many(self, batch: Iterable[dict[str, Any]]) -> None:
        """Publish events in order through one pipeline. Raises redis.RedisError."""
        self.publish_serialized((event["type"], events.dumps(event)) for event in batch)

    def publish_serialized(self, batch: Iterable[tuple[str, str]]) -> None:
        """Publish ``(type, JSON text)`` pairs in order through one pipeline.

        The pipeline is not a transaction: after an error some events may have gone out,
        which the outbox turns into a duplicate on retry, never a loss.
        """
        with self.redis.pipeline(transaction=False) as pipe:
            count = 0
            for event_type, payload in batch:
                self._call(event_type, payload, pipe)
                count += 1
            if count:
                pipe.execute()
