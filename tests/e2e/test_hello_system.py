"""The original system end to end: the real hello-publisher and the real Go binary.

For each PATTERN we start both processes against a real Redis server and read what the
Go subscriber prints: only pub-sub lines, only queue lines, or every message twice. The
same runs again on a Redis Cluster (REDIS_CLUSTER=1 for both processes, the seed node
as REDIS_HOST/REDIS_PORT): PUBLISH on one node reaches the subscriber on another.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from devtools.redis_server import free_port
from tests.helpers import BIN, Proc, wait_for
from tests.topology import Topology

pytestmark = pytest.mark.e2e

LINE = re.compile(
    r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\] \[python-publisher\] Hello from Python #(\d+) "
    r"\(ID: [0-9a-f-]{36}\) \[Received #(\d+) from (pub-sub|queue)\]$"
)


def _env(redis_url: str, pattern: str) -> dict[str, str]:
    host, port = redis_url.split("//")[1].split("/")[0].split(":")
    return {
        "REDIS_HOST": host,
        "REDIS_PORT": port,
        "PATTERN": pattern,
        "PUBLISH_INTERVAL": "0.1",
        "REDIS_CONNECT_RETRY_DELAY": "0.2",
    }


@pytest.mark.parametrize("pattern", ["pubsub", "queue", "both"])
def test_publisher_to_go_subscriber(
    pattern: str,
    topology: Topology,
    go_subscriber_binary: Path,
    tmp_path: Path,
) -> None:
    env = {**_env(topology.redis_url, pattern), "REDIS_CLUSTER": topology.env["REDIS_CLUSTER"]}
    sub = Proc([str(go_subscriber_binary)], env, tmp_path / "sub.log")
    # The pub/sub path is live-only: start publishing once the subscriber listens.
    if pattern != "queue":
        sub.wait_output("Successfully subscribed to 'messages' channel")
    else:
        sub.wait_output("Starting queue subscriber on list 'message_queue'")
    pub = Proc([str(BIN / "hello-publisher")], env, tmp_path / "pub.log")
    sub.wait_output("Hello from Python #5 ", count=2 if pattern == "both" else 1)

    assert pub.terminate() == 0
    assert sub.terminate() == 0
    pub_out, sub_out = pub.output(), sub.output()
    assert "Starting Python Publisher..." in pub_out
    assert f"Pattern: {pattern}" in pub_out
    assert "Publisher stopped. Total messages sent:" in pub_out

    shown = [m.groups() for m in map(LINE.match, sub_out.splitlines()) if m]
    sources = {s for *_, s in shown}
    counts_by_source: dict[str, list[int]] = {}
    for _, n, _, source in shown:
        counts_by_source.setdefault(source, []).append(int(n))
    if pattern == "pubsub":
        assert sources == {"pub-sub"}
    elif pattern == "queue":
        assert sources == {"queue"}
    else:
        assert sources == {"pub-sub", "queue"}
        # Every message published while both listened arrives once on each path.
        assert set(range(1, 6)) <= set(counts_by_source["pub-sub"]) & set(counts_by_source["queue"])
    # The received counter is shared by both goroutines: 1..N without gaps.
    assert sorted(int(r) for *_, r, _ in shown) == list(range(1, len(shown) + 1))
    # The message's own (UTC) timestamp is shown, not a parse failure.
    assert "Failed to parse" not in sub_out
    assert f"Subscriber stopped. Total messages received: {len(shown)}" in sub_out
    assert "Publisher stopped" in pub_out


INTERVAL = 30.0
"""The publisher's PUBLISH_INTERVAL in the SIGTERM test: far longer than any stop."""


def test_publisher_stops_on_sigterm_without_waiting_out_its_interval(
    redis_url: str, tmp_path: Path
) -> None:
    env = {**_env(redis_url, "both"), "PUBLISH_INTERVAL": str(INTERVAL)}
    pub = Proc([str(BIN / "hello-publisher")], env, tmp_path / "pub.log")
    pub.wait_output("Hello from Python #1")
    started = time.monotonic()
    # terminate() SIGKILLs at its deadline (exit -9): 0 means the SIGTERM stopped it.
    assert pub.terminate(timeout=INTERVAL / 2) == 0
    elapsed = time.monotonic() - started
    # The limit is the interval itself: a publisher that slept it out would take >= 30 s.
    assert elapsed < INTERVAL / 2, f"SIGTERM took {elapsed:.1f}s of a {INTERVAL:g} s interval"
    assert "Received signal 15. Shutting down gracefully..." in pub.output()
    assert "Publisher stopped. Total messages sent: 1" in pub.output()


def test_publisher_without_redis_retries_then_exits_1(tmp_path: Path) -> None:
    env = {
        "REDIS_HOST": "127.0.0.1",
        "REDIS_PORT": str(free_port()),
        "REDIS_CONNECT_RETRY_DELAY": "0.05",
    }
    pub = Proc([str(BIN / "hello-publisher")], env, tmp_path / "pub.log")
    assert pub.popen.wait(30) == 1
    out = pub.output()
    for attempt in range(1, 5):
        assert f"Connection attempt {attempt}/5 failed. Retrying in 0.05s..." in out
    assert "Failed to connect to Redis after 5 attempts. Exiting." in out


@pytest.mark.parametrize(
    ("env", "error"),
    [
        ({"PATTERN": "fanout"}, "invalid PATTERN 'fanout': must be pubsub, queue or both"),
        ({"REDIS_PORT": "sixthousand"}, "invalid REDIS_PORT 'sixthousand': must be an integer"),
        ({"PUBLISH_INTERVAL": "soon"}, "invalid PUBLISH_INTERVAL 'soon'"),
    ],
)
def test_publisher_bad_config_is_one_line_and_exit_2(
    env: dict[str, str], error: str, tmp_path: Path
) -> None:
    pub = Proc([str(BIN / "hello-publisher")], env, tmp_path / "pub.log")
    assert pub.popen.wait(30) == 2
    assert pub.lines() == [f"hello-publisher: {error}"] or pub.lines()[0].startswith(
        f"hello-publisher: {error}"
    )
    assert len(pub.lines()) == 1


@pytest.mark.parametrize("pattern", ["sometimes", "BOTH"])
def test_go_subscriber_rejects_unknown_pattern(
    pattern: str, go_subscriber_binary: Path, tmp_path: Path
) -> None:
    sub = Proc([str(go_subscriber_binary)], {"PATTERN": pattern}, tmp_path / "sub.log")
    assert sub.popen.wait(30) == 2
    assert "invalid PATTERN" in sub.output()


def test_go_subscriber_survives_a_redis_restart(
    redis_server_factory,
    go_subscriber_binary: Path,
    tmp_path: Path,  # noqa: ANN001
) -> None:
    server = redis_server_factory(appendonly=True)
    env = _env(server.url, "both")
    sub = Proc([str(go_subscriber_binary)], env, tmp_path / "sub.log")
    sub.wait_output("Successfully subscribed to 'messages' channel")
    pub = Proc([str(BIN / "hello-publisher")], env, tmp_path / "pub.log")
    sub.wait_output("Hello from Python #2 ", count=2)
    server.restart()
    mark = pub.output().count("Pushed to queue")
    wait_for(
        lambda: pub.output().count("Pushed to queue") >= mark + 3,
        timeout=20,
        message="publisher pushing again after the restart",
    )
    # Both paths deliver again after Redis came back (pub/sub resubscribes by itself).
    last = pub.output().count("Pushed to queue")
    sub.wait_output(f"Hello from Python #{last} ", timeout=20)
    wait_for(
        lambda: any(
            f"#{n} " in line and "pub-sub" in line
            for line in sub.lines()
            for n in range(last, last + 50)
        ),
        timeout=20,
        message="a pub-sub line after the restart",
    )
    assert pub.terminate() == 0
    assert sub.terminate() == 0
