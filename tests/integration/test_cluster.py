"""What only matters on Redis Cluster: REDIS_WAIT_REPLICAS, and a client that connects late.

The behaviour shared with one node (publishing, the queue, the relay) is tested on both
topologies by the other integration tests through the ``topology`` fixture.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import redis as redis_lib

from devtools import redis_server
from devtools.redis_server import free_cluster_port
from messaging import envelope, keys
from messaging.config import Settings
from messaging.connection import connect_with_retries, redis_client
from messaging.publisher import EventPublisher, ReplicaAckError
from tests.topology import Topology


def _placed(order_id: int) -> dict[str, object]:
    return envelope.envelope(
        envelope.ORDER_PLACED,
        {"order_id": order_id},
        message=f"Order #{order_id} placed",
        sender="test",
        count=order_id,
    )


def test_wait_replicas_holds_a_publish_until_a_replica_has_it(topology: Topology) -> None:
    client = topology.client()
    event = _placed(1)
    publisher = EventPublisher(client, "queue", wait_replicas=1)
    if topology.cluster:  # every master has a replica: WAIT 1 is satisfied
        publisher.publish(event)
        for queue in envelope.queues_for(envelope.ORDER_PLACED):
            assert [json.loads(m)["id"] for m in client.lrange(keys.pending(queue), 0, -1)] == [
                event["id"]
            ]
    else:  # a lone server has no replica: the publish fails, so the outbox would retry
        with pytest.raises(ReplicaAckError, match="0 of 1 replica"):
            publisher.publish(event)
    with pytest.raises(ReplicaAckError, match="of 2 replica"):
        EventPublisher(client, "queue", wait_replicas=2).publish(_placed(2))
    client.close()


def test_cluster_client_connects_on_first_use_and_retries() -> None:
    settings = Settings.from_env(
        {
            "REDIS_CLUSTER": "1",
            "REDIS_PORT": str(free_cluster_port()),
            "REDIS_CONNECT_ATTEMPTS": "2",
            "REDIS_CONNECT_RETRY_DELAY": "0",
        }
    )
    client = redis_client(settings)  # nothing listens: building it must not raise
    with pytest.raises(redis_lib.ConnectionError):
        client.ping()
    assert connect_with_retries(client, settings) is False
    client.close()


def test_a_node_whose_port_is_taken_after_the_pick_starts_on_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CI once lost a whole run to one node exiting "Address already in use": something
    bound its bus port between the pick and redis-server's bind. The cluster re-picks."""
    taken = redis_server.free_cluster_port()
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", taken + 10000))  # the bus port, as in CI
    squatter.listen()
    picks = iter([taken])
    real = redis_server.free_cluster_port
    monkeypatch.setattr(redis_server, "free_cluster_port", lambda: next(picks, None) or real())
    cluster = redis_server.RedisCluster(masters=3, replicas=0, root=tmp_path)
    try:
        cluster.start(timeout=30)
        assert taken not in [node.port for node in cluster.nodes]
        assert "already in use" in (tmp_path / "node-0" / "redis.log").read_text()
    finally:
        for node in cluster.nodes:
            node.stop()
        squatter.close()


def test_cluster_ports_stay_below_the_kernels_ephemeral_range() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(50):
        port = redis_server.free_cluster_port()
        assert port + 10000 < low
