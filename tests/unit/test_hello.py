"""The Hello message and the publisher's PATTERN switch (fakeredis: no I/O)."""

from __future__ import annotations

import json
import logging
import uuid
from datetime import datetime, timedelta

import fakeredis
import pytest

from hello import publisher as hello
from messaging import keys
from messaging.config import Settings


def test_message_has_the_original_fields_and_a_utc_timestamp() -> None:
    msg = hello.create_message(7)
    assert set(msg) == {"id", "timestamp", "message", "sender", "count"}
    assert msg["message"] == "Hello from Python #7"
    assert msg["sender"] == "python-publisher"
    assert msg["count"] == 7
    uuid.UUID(msg["id"])
    stamp = datetime.fromisoformat(msg["timestamp"])
    # The original sent a zone-less local time; ours must carry the UTC offset.
    assert stamp.utcoffset() == timedelta(0)
    assert msg["timestamp"].endswith("+00:00")


def test_ids_are_unique() -> None:
    assert len({hello.create_message(1)["id"] for _ in range(100)}) == 100


@pytest.mark.parametrize(
    ("pattern", "published", "pushed"),
    [("pubsub", True, False), ("queue", False, True), ("both", True, True)],
)
def test_pattern_switch(
    pattern: str, published: bool, pushed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    client = fakeredis.FakeRedis(decode_responses=True)
    pub = hello.HelloPublisher(client, Settings.from_env({"PATTERN": pattern}))
    caplog.set_level(logging.INFO)
    assert pub.publish_message(hello.create_message(1))
    text = caplog.text
    assert (
        "Published to channel 'messages' (0 subscribers): Hello from Python #1" in text
    ) == published
    assert ("Pushed to queue 'message_queue' (length: 1): Hello from Python #1" in text) == pushed
    assert client.llen(keys.HELLO_QUEUE) == (1 if pushed else 0)
    if pushed:
        assert json.loads(client.lindex(keys.HELLO_QUEUE, 0))["count"] == 1


def test_redis_error_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    server = fakeredis.FakeServer()
    server.connected = False
    client = fakeredis.FakeRedis(server=server)
    pub = hello.HelloPublisher(client, Settings.from_env({}))
    caplog.set_level(logging.INFO)
    assert pub.publish_message(hello.create_message(1)) is False
    assert "Failed to publish message:" in caplog.text


def test_bad_config_exits_2_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATTERN", "sometimes")
    with pytest.raises(SystemExit) as stopped:
        hello.main([])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err == "hello-publisher: invalid PATTERN 'sometimes': must be pubsub, queue or both\n"
