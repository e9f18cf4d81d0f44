"""The dashboard's JSON API, /metrics and ``orders-admin`` on a real Redis.

The same known queue contents must show the same numbers in all three views: 3
pending, 2 in flight, 1 delayed, 2 dead, 1 processed, 3 failed, 2 registered workers
of which 1 alive.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_lib
from flask import Flask
from sqlalchemy.orm import Session

from messaging import envelope, keys, monitor
from messaging.queue import RedisQueue
from orders.history import record_event
from tests.helpers import BIN, Proc, wait_for
from tests.orders_app import ADMIN as OPERATOR
from tests.orders_app import ORDER, build_app

ADMIN = str(BIN / "orders-admin")
EXPECTED = {
    "pending": 3,
    "in_flight": 2,
    "delayed": 1,
    "dead": 2,
    "processed": 1,
    "failed": 3,
    "retried": 1,
    "workers": 2,
    "workers_alive": 1,
}


def _message(n: int) -> bytes:
    return json.dumps({"id": f"evt-{n}", "type": "OrderPlaced", "version": 1, "data": {}}).encode()


@pytest.fixture
def raw(redis: redis_lib.Redis, redis_url: str) -> Iterator[redis_lib.Redis]:
    """A bytes client on the (flushed) test database."""
    client = redis_lib.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def known(raw: redis_lib.Redis) -> RedisQueue:
    """The payment queue with the contents of EXPECTED (and an empty rest)."""
    queue = RedisQueue(raw, "payment", backoff_base=3600.0, backoff_max=3600.0)
    queue.push(*(_message(n) for n in range(9)))
    queue.heartbeat("alive-worker", 60)
    raw.sadd(keys.workers("payment"), "ghost-worker")  # registered, heartbeat gone
    taken = queue.take("alive-worker", 6, 0)
    assert len(taken) == 6
    assert queue.ack("alive-worker", [taken[0]]) == 1
    # Nobody promotes due retries here: the retry stays in the delayed set.
    assert queue.fail("alive-worker", taken[1], "RetryableError: later") == "retried"
    assert queue.fail("alive-worker", taken[2], "PermanentError: bad", permanent=True) == "dead"
    assert queue.fail("alive-worker", taken[3], "PermanentError: <b>x</b>", permanent=True) == (
        "dead"
    )
    return queue


@pytest.fixture
def app(tmp_path: Path, redis_url: str, redis: redis_lib.Redis) -> Iterator[Flask]:
    app = build_app(f"sqlite:///{tmp_path / 'o.db'}", redis_url)
    yield app
    app.extensions["orders"].close()


def _admin(redis_url: str, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ADMIN, *argv],
        env={"REDIS_URL": redis_url, "PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


# --- the same figures everywhere ---------------------------------------------------------


def test_figures_read_from_redis(known: RedisQueue, raw: redis_lib.Redis) -> None:
    figures = monitor.queue_figures(raw, "payment")
    assert {k: getattr(figures, k) for k in EXPECTED} == EXPECTED
    empty = monitor.queue_figures(raw, "invoice")
    assert all(getattr(empty, k) == 0 for k in EXPECTED)


def test_api_queues_shows_the_known_figures(app: Flask, known: RedisQueue) -> None:
    body = app.test_client().get("/api/queues", headers=OPERATOR).get_json()
    by_name = {q["name"]: q for q in body["queues"]}
    assert list(by_name) == ["payment", "invoice", "shipping", "email", "order-updates"]
    assert {k: by_name["payment"][k] for k in EXPECTED} == EXPECTED
    assert by_name["invoice"]["pending"] == 0


def test_metrics_shows_the_known_figures(app: Flask, known: RedisQueue) -> None:
    response = app.test_client().get("/metrics", headers=OPERATOR)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = response.get_data(as_text=True)
    sample = {
        "orders_queue_pending": 3,
        "orders_queue_in_flight": 2,
        "orders_queue_delayed": 1,
        "orders_queue_dead": 2,
        "orders_queue_workers_alive": 1,
        "orders_queue_processed_total": 1,
        "orders_queue_failed_total": 3,
        "orders_queue_retried_total": 1,
    }
    for name, value in sample.items():
        assert f'{name}{{queue="payment"}} {float(value)}' in text, name
        assert f'{name}{{queue="invoice"}} 0.0' in text, name
    assert "orders_redis_up 1.0" in text
    assert "orders_database_up 1.0" in text
    assert "orders_outbox_backlog 0.0" in text


def test_admin_queues_shows_the_known_figures(redis_url: str, known: RedisQueue) -> None:
    result = _admin(redis_url, "queues", "--sample", "0")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "queue", "pending", "in", "flight", "delayed", "dead", "processed", "failed",
        "workers", "alive", "processed/s",
    ]  # fmt: skip
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows["payment"] == ["3", "2", "1", "2", "1", "3", "1", "-"]
    assert rows["order-updates"] == ["0", "0", "0", "0", "0", "0", "0", "-"]


def test_admin_queues_measures_processed_per_second(redis_url: str, known: RedisQueue) -> None:
    result = _admin(redis_url, "queues", "--sample", "0.2")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[1:]}
    assert rows["payment"][-1] == "0.0"  # nothing processed during the sample


# --- metrics of the API itself ----------------------------------------------------------------


def test_metrics_count_requests_orders_and_the_outbox(app: Flask) -> None:
    client = app.test_client()

    def value(text: str, pattern: str) -> float:
        match = re.search(pattern + r" ([0-9.e+]+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    before = client.get("/metrics", headers=OPERATOR).get_data(as_text=True)
    assert client.post("/orders", json=ORDER).status_code == 201
    assert client.get("/orders/999999").status_code == 404
    after = client.get("/metrics", headers=OPERATOR).get_data(as_text=True)
    placed = r"^orders_placed_total"
    assert value(after, placed) == value(before, placed) + 1
    not_found = (
        r'^orders_http_requests_total\{method="GET",route="/orders/<int:order_id>",status="404"\}'
    )
    assert value(after, not_found) == value(before, not_found) + 1
    latency = r'^orders_http_request_duration_seconds_count\{method="POST",route="/orders"\}'
    assert value(after, latency) == value(before, latency) + 1

    # The fast path published it; its mark is batched (a marker thread), so the outbox
    # figures follow within moments, not necessarily in this very scrape.
    def marked() -> bool:
        text = client.get("/metrics", headers=OPERATOR).get_data(as_text=True)
        return "orders_events_published_total 1.0" in text and ("orders_outbox_backlog 0.0" in text)

    wait_for(marked, timeout=10, message="the published event marked in the outbox")


def test_metrics_answer_when_redis_is_down(tmp_path: Path) -> None:
    app = build_app(f"sqlite:///{tmp_path / 'o.db'}", "redis://127.0.0.1:1/0")
    try:
        response = app.test_client().get("/metrics", headers=OPERATOR)
        assert response.status_code == 200
        text = response.get_data(as_text=True)
        assert "orders_redis_up 0.0" in text
        assert "orders_queue_pending" not in text
        assert app.test_client().get("/api/queues", headers=OPERATOR).status_code == 503
    finally:
        app.extensions["orders"].close()


# --- dead letters: HTTP -------------------------------------------------------------------------


def test_dead_letters_list_requeue_and_discard_over_http(
    app: Flask, known: RedisQueue, raw: redis_lib.Redis
) -> None:
    client = app.test_client()
    items = client.get("/api/queues/payment/dead-letters", headers=OPERATOR).get_json()["items"]
    assert [(x["index"], x["error"]) for x in items] == [
        (0, "PermanentError: bad"),
        (1, "PermanentError: <b>x</b>"),
    ]
    first, second = items
    assert json.loads(first["message"])["id"] == "evt-2"
    assert first["cause"] == second["cause"] == "permanent"  # not revived by itself

    base = "/api/queues/payment/dead-letters"
    # Only JSON: a cross-site form post cannot requeue.
    form = client.post(f"{base}/{first['id']}/requeue", data={"x": "1"}, headers=OPERATOR)
    assert form.status_code == 415
    assert raw.llen(keys.dead("payment")) == 2

    done = client.post(f"{base}/{first['id']}/requeue", json={}, headers=OPERATOR)
    assert done.status_code == 200
    assert done.get_json() == {"queue": "payment", "id": first["id"], "action": "requeue"}
    assert raw.lrange(keys.pending("payment"), -1, -1) == [_message(2)]
    assert raw.llen(keys.pending("payment")) == 4

    again = client.post(f"{base}/{first['id']}/requeue", json={}, headers=OPERATOR)
    assert again.status_code == 404
    assert again.headers["Content-Type"] == "application/problem+json"

    # By index: the second letter is now at index 0.
    gone = client.post(f"{base}/0/discard", json={}, headers=OPERATOR)
    assert gone.status_code == 200 and gone.get_json()["id"] == second["id"]
    assert raw.llen(keys.dead("payment")) == 0
    assert raw.llen(keys.pending("payment")) == 4  # discard does not requeue
    assert client.post(f"{base}/0/discard", json={}, headers=OPERATOR).status_code == 404
    assert client.get("/api/queues/nope/dead-letters", headers=OPERATOR).status_code == 404


# --- the dashboard page and the event stream -------------------------------------------------


def test_dashboard_page_has_a_strict_csp_and_no_inline_script(app: Flask) -> None:
    client = app.test_client()
    page = client.get("/", headers=OPERATOR)
    assert page.status_code == 200
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers["Referrer-Policy"] == "same-origin"
    html = page.get_data(as_text=True)
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.DOTALL)
    assert scripts and all('src="' in attrs and not body.strip() for attrs, body in scripts)
    assert not re.search(r"\son[a-z]+=", html), "no inline event handlers"
    js = client.get("/static/dashboard.js")
    assert js.status_code == 200 and js.headers["X-Content-Type-Options"] == "nosniff"
    source = js.get_data(as_text=True)
    js.close()
    assert "innerHTML" not in source and "insertAdjacentHTML" not in source
    assert "eval(" not in source


def test_event_stream_is_a_redirect_to_orders_stream_with_a_ticket(
    tmp_path: Path, redis_url: str, redis: redis_lib.Redis
) -> None:
    app = build_app(
        f"sqlite:///{tmp_path / 'o.db'}", redis_url, STREAM_PORT="8123", ALLOWED_HOSTS="*"
    )
    try:
        client = app.test_client()
        base = "http://dash.example:8000"
        assert client.get("/events/stream", base_url=base).status_code == 401  # operators only
        response = client.get("/events/stream", base_url=base, headers=OPERATOR)
        # Answered at once: a stream never holds one of orders-api's threads.
        assert response.status_code == 307
        location = response.headers["Location"]
        assert location.startswith("http://dash.example:8123/events/stream?ticket=")
        ticket = location.split("ticket=", 1)[1]
        assert redis.ttl(keys.stream_ticket(ticket)) > 3000  # orders-stream checks it there
        page = client.get("/", base_url=base, headers=OPERATOR)
        assert 'data-stream-url="http://dash.example:8123/events/stream?ticket=' in page.text
        policy = page.headers["Content-Security-Policy"]
        assert "connect-src 'self' http://dash.example:8123;" in policy
        assert "script-src 'self';" in policy and "unsafe-inline" not in policy
        fresh = client.get("/api/stream-url", base_url=base, headers=OPERATOR).get_json()
        assert fresh["url"].split("ticket=", 1)[1] != ticket
        # Other responses keep the plain policy.
        queues = client.get("/api/queues", base_url=base, headers=OPERATOR)
        assert "8123" not in queues.headers["Content-Security-Policy"]
    finally:
        app.extensions["orders"].close()


def test_stream_url_setting_names_a_proxied_feed(tmp_path: Path, redis_url: str) -> None:
    app = build_app(f"sqlite:///{tmp_path / 'o.db'}", redis_url, STREAM_URL="/feed/stream")
    try:
        page = app.test_client().get("/", headers=OPERATOR)
        assert 'data-stream-url="/feed/stream?ticket=' in page.text
        assert "connect-src 'self';" in page.headers["Content-Security-Policy"]
    finally:
        app.extensions["orders"].close()


# --- orders-admin ---------------------------------------------------------------------------


def test_admin_dead_letters_list_show_requeue_purge(
    redis_url: str, known: RedisQueue, raw: redis_lib.Redis
) -> None:
    listed = _admin(redis_url, "dead-letters", "list", "payment")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 2
    first_id, second_id = (line.split()[0] for line in lines)
    assert "#0" in lines[0] and "attempts=1" in lines[0] and "PermanentError: bad" in lines[0]

    shown = _admin(redis_url, "dead-letters", "show", "payment", second_id)
    assert shown.returncode == 0
    assert "error:     PermanentError: <b>x</b>" in shown.stdout
    assert "cause:     permanent\n" in shown.stdout  # not revived by itself
    assert '"id": "evt-3"' in shown.stdout

    requeued = _admin(redis_url, "dead-letters", "requeue", "payment", first_id)
    assert (requeued.returncode, requeued.stdout) == (0, f"payment: requeued {first_id}\n")
    assert raw.lrange(keys.pending("payment"), -1, -1) == [_message(2)]

    missing = _admin(redis_url, "dead-letters", "requeue", "payment", first_id)
    assert missing.returncode == 1
    assert missing.stderr == f"orders-admin: payment has no dead letter {first_id}\n"

    purged = _admin(redis_url, "dead-letters", "purge", "payment", "--all")
    assert (purged.returncode, purged.stdout) == (0, "payment: purged 1 dead letter(s)\n")
    assert raw.llen(keys.dead("payment")) == 0
    empty = _admin(redis_url, "dead-letters", "list", "payment")
    assert empty.stdout == "payment: no dead letters\n"


def test_admin_requeue_all(redis_url: str, known: RedisQueue, raw: redis_lib.Redis) -> None:
    result = _admin(redis_url, "dead-letters", "requeue", "payment", "--all")
    assert (result.returncode, result.stdout) == (0, "payment: requeued 2 dead letter(s)\n")
    assert raw.lrange(keys.pending("payment"), -2, -1) == [_message(2), _message(3)]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["dead-letters", "list", "nope"], "unknown queue 'nope'"),
        (["dead-letters", "requeue", "payment"], "which dead letters? give their IDs"),
        (["orders", "show", "abc"], "argument ORDER_ID: 'abc' is not an integer"),
        (["queues", "--sample", "-1"], "argument --sample: '-1' is not between 0 and 60"),
    ],
)
def test_admin_bad_arguments_exit_2(redis_url: str, argv: list[str], needle: str) -> None:
    result = _admin(redis_url, *argv)
    assert result.returncode == 2
    assert needle in result.stderr and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_admin_bad_config_exits_2() -> None:
    result = _admin("", "queues", REDIS_URL="", REDIS_PORT="not-a-port")
    assert result.returncode == 2
    assert result.stderr == "orders-admin: invalid REDIS_PORT 'not-a-port': must be an integer\n"


@pytest.mark.parametrize("argv", [["queues"], ["dead-letters", "list", "payment"], ["watch"]])
def test_admin_unreachable_redis_is_one_line_and_exit_1(argv: list[str]) -> None:
    from devtools.redis_server import free_port

    port = free_port()
    result = _admin(f"redis://127.0.0.1:{port}/0", *argv)
    assert result.returncode == 1
    assert result.stderr.startswith(f"orders-admin: cannot reach Redis at 127.0.0.1:{port}: ")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_admin_orders_show(tmp_path: Path, redis_url: str, app: Flask) -> None:
    db_url = app.extensions["orders"].settings.database_url
    order_id = app.test_client().post("/orders", json=ORDER).get_json()["id"]
    captured = envelope.envelope(
        envelope.PAYMENT_CAPTURED,
        {"order_id": order_id, "amount": "25.00", "currency": "EUR"},
        message="paid",
        sender="payment",
        count=order_id,
    )
    with Session(app.extensions["orders"].engine) as session:
        record_event(session, captured)
        session.commit()
    result = _admin(redis_url, "orders", "show", str(order_id), DATABASE_URL=db_url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"order #{order_id}  paid"
    assert "customer:  ada@example.com" in lines
    assert "total:     25.00 EUR" in lines
    assert lines[-1].endswith(f"PaymentCaptured  {captured['id']}")
    missing = _admin(redis_url, "orders", "show", "4242", DATABASE_URL=db_url)
    assert (missing.returncode, missing.stderr) == (1, "orders-admin: there is no order 4242\n")


def test_admin_watch_prints_one_line_per_event_until_ctrl_c(
    tmp_path: Path, redis_url: str, redis: redis_lib.Redis
) -> None:
    watch = Proc([ADMIN, "watch"], {"REDIS_URL": redis_url}, tmp_path / "watch.log")
    try:
        watch.wait_output("watching orders:events")
        wait_for(lambda: redis.pubsub_numsub(keys.ORDER_EVENTS_CHANNEL)[0][1] == 1)
        event = envelope.envelope(
            envelope.ORDER_PLACED, {"order_id": 7}, message="Order #7 placed", sender="t", count=7
        )
        redis.publish(keys.ORDER_EVENTS_CHANNEL, envelope.dumps(event))
        redis.publish(keys.ORDER_EVENTS_CHANNEL, "\x1b[31mred\x1b[0m not json")
        out = watch.wait_output("not json")
        lines = out.splitlines()[1:]
        assert len(lines) == 2
        assert re.fullmatch(
            rf"\d\d:\d\d:\d\d\.\d{{3}}  OrderPlaced +order #7 +{event['id']}  Order #7 placed",
            lines[0],
        )
        assert "\x1b" not in out and "\\x1b[31mred" in lines[1]  # no terminal escapes
        watch.popen.send_signal(signal.SIGINT)
        assert watch.popen.wait(10) == 0
    finally:
        watch.kill()


def test_stages_window_is_checked_and_empty_without_orders(app: Flask) -> None:
    client = app.test_client()
    body = client.get("/api/stages?minutes=5", headers=OPERATOR).get_json()
    assert body["minutes"] == 5 and body["bucket_seconds"] == 10 and body["stages"] == {}
    assert len(body["buckets"]) in (30, 31)
    bad = client.get("/api/stages?minutes=0", headers=OPERATOR)
    assert bad.status_code == 400 and bad.mimetype == "application/problem+json"
    assert bad.get_json()["errors"][0]["field"] == "minutes"
    assert client.get("/api/stages").status_code == 401
