"""The Hello publisher against a real Redis server, for each PATTERN."""

from __future__ import annotations

import json
import logging

import pytest
import redis as redis_lib

from hello import publisher as hello
from messaging import keys
from messaging.config import Settings
from messaging.connection import redis_client
from tests.helpers import wait_for


def _settings(redis_url: str, pattern: str) -> Settings:
    return Settings.from_env({"REDIS_URL": redis_url, "PATTERN": pattern})


@pytest.mark.parametrize(
    ("pattern", "subscribers", "length"),
    [("pubsub", 1, 0), ("queue", 0, 3), ("both", 1, 3)],
)
def test_publisher_per_pattern(
    redis: redis_lib.Redis,
    redis_url: str,
    pattern: str,
    subscribers: int,
    length: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    listener = redis.pubsub()
    listener.subscribe(keys.HELLO_CHANNEL)
    assert listener.get_message(timeout=2)["type"] == "subscribe"
    caplog.set_level(logging.INFO)
    pub = hello.HelloPublisher(
        redis_client(_settings(redis_url, pattern)), _settings(redis_url, pattern)
    )
    for n in (1, 2, 3):
        assert pub.publish_message(hello.create_message(n))

    assert redis.llen(keys.HELLO_QUEUE) == length
    if pattern != "queue":
        assert f"Published to channel 'messages' ({subscribers} subscribers)" in caplog.text
        got = [
            wait_for(lambda: listener.get_message(timeout=0.1), message="pub/sub message")
            for _ in range(3)
        ]
        assert [json.loads(m["data"])["count"] for m in got] == [1, 2, 3]
    else:
        assert "Published to channel" not in caplog.text
        assert listener.get_message(timeout=0.2) is None
    if length:
        assert "Pushed to queue 'message_queue' (length: 3): Hello from Python #3" in caplog.text
        assert [json.loads(m)["count"] for m in redis.lrange(keys.HELLO_QUEUE, 0, -1)] == [1, 2, 3]
    listener.close()
