"""The operator surface behind a credential (issue 14, item 4), on a real app and Redis.

On main before the fix anyone who reached the port could list every customer's email
(``GET /orders``), read ``/metrics`` and requeue or discard dead letters: 16 anonymous
discards emptied a queue's dead letters for good. Now every endpoint outside the public
API needs ``ADMIN_TOKEN`` (bearer header, or the dashboard's HttpOnly SameSite=Strict
cookie plus a same-origin ``Origin`` for changes), every request's Host must be allowed
(DNS rebinding), and every response carries the security headers.
"""

from __future__ import annotations

import json
import logging
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_lib
from flask import Flask
from flask.testing import FlaskClient

from devtools.redis_server import free_port
from messaging import envelope, keys
from messaging.queue import RedisQueue
from orders import auth, openapi
from orders.app import create_app
from orders.bootstrap import create_schema
from orders.history import record_event
from tests.helpers import BIN, Proc, wait_for
from tests.orders_app import ADMIN, ADMIN_TOKEN, ORDER, build_app

SAME_ORIGIN = {"Origin": "http://localhost"}


@pytest.fixture
def app(tmp_path: Path, redis_url: str, redis: redis_lib.Redis) -> Iterator[Flask]:
    # The failed-token throttle off: these tests send wrong tokens on purpose, and
    # test_wrong_tokens_are_throttled_per_client below tests it on its own app.
    app = build_app(
        f"sqlite:///{tmp_path / 'orders.db'}",
        redis_url,
        RATE_LIMIT_PER_MINUTE="0",
        AUTH_FAILURES_PER_MINUTE="0",
    )
    yield app
    app.extensions["orders"].close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def _path(rule: str) -> str:
    return re.sub(r"<(?:int:)?(\w+)>", lambda m: "1" if "int:" in m.group(0) else "payment", rule)


def _dead_letters(redis_url: str, count: int) -> RedisQueue:
    queue = RedisQueue(redis_lib.Redis.from_url(redis_url), "payment")
    for n in range(count):
        queue.push(json.dumps({"id": f"evt-{n}", "type": "OrderPlaced"}))
    for message in queue.take("w1", count, timeout=1):
        queue.fail("w1", message, "PermanentError: test", permanent=True)
    return queue


def test_every_endpoint_outside_the_public_api_needs_the_credential(
    app: Flask, client: FlaskClient
) -> None:
    public, protected = set(), set()
    for rule in app.url_map.iter_rules():
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            path = _path(rule.rule)
            if rule.endpoint == "static":
                path = "/static/dashboard.js"
            if rule.endpoint == "auth.login":
                response = client.post(path, data={"token": ADMIN_TOKEN})
                client.delete_cookie(auth.COOKIE)
            else:
                response = client.open(path, method=method, json={} if method == "POST" else None)
            response.close()
            key = (rule.rule, method, rule.endpoint)
            (protected if response.status_code == 401 else public).add(key)
    assert {e for _, _, e in public} == auth.PUBLIC_ENDPOINTS
    assert {e for _, _, e in protected} >= {
        "orders.get_orders",
        "metrics.scrape",
        "dashboard.page",
        "dashboard.queues",
        "dashboard.dead_letters",
        "dashboard.requeue",
        "dashboard.discard",
        "dashboard.event_stream",
    }
    # The OpenAPI document says the same (its security requirement and its 401).
    doc = openapi.openapi_document(app.extensions["orders"].settings)
    for rule, method, _endpoint in protected:
        operation = doc["paths"][re.sub(r"<(?:int:)?(\w+)>", r"{\1}", rule)][method.lower()]
        assert operation["security"] and "401" in operation["responses"], (rule, method)


def test_anonymous_clients_cannot_touch_dead_letters(
    client: FlaskClient, redis_url: str, redis: redis_lib.Redis
) -> None:
    queue = _dead_letters(redis_url, 16)
    base = "/api/queues/payment/dead-letters"
    for n in range(16):  # what emptied a queue's dead letters on main
        for action in ("discard", "requeue"):
            response = client.post(f"{base}/0/{action}", json={})
            assert response.status_code == 401
            assert response.content_type == "application/problem+json"
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = client.post(f"{base}/0/discard", json={}, headers={"Authorization": "Bearer x"})
        assert wrong.status_code == 401, n
    assert client.get(base).status_code == 401
    assert len(queue.dead_letters()) == 16
    assert client.post(f"{base}/0/discard", json={}, headers=ADMIN).status_code == 200
    assert len(queue.dead_letters()) == 15


def test_the_order_list_and_metrics_need_the_credential(client: FlaskClient) -> None:
    assert client.post("/orders", json=ORDER).status_code == 201
    anonymous = client.get("/orders")
    assert anonymous.status_code == 401 and "ada@example.com" not in anonymous.get_data(True)
    assert client.get("/metrics").status_code == 401
    listed = client.get("/orders", headers=ADMIN)
    assert listed.get_json()["items"][0]["customer_email"] == "ada@example.com"
    assert listed.headers["Cache-Control"] == "no-store"
    assert client.get("/metrics", headers=ADMIN).status_code == 200


def test_one_order_is_public_with_its_email_masked(client: FlaskClient) -> None:
    created = client.post("/orders", json=ORDER)
    assert created.get_json()["customer_email"] == "ada@example.com"  # the poster's own
    order_id = created.get_json()["id"]
    assert client.get(f"/orders/{order_id}").get_json()["customer_email"] == "a***@example.com"
    full = client.get(f"/orders/{order_id}", headers=ADMIN).get_json()
    assert full["customer_email"] == "ada@example.com"


def test_the_logged_url_logs_in_once_and_the_cookie_is_strict(client: FlaskClient) -> None:
    assert client.get("/").status_code == 401  # the login form
    wrong = client.get("/?token=nope")
    assert wrong.status_code == 401 and "not the token" in wrong.get_data(as_text=True)
    assert "Set-Cookie" not in wrong.headers
    response = client.get(f"/?token={ADMIN_TOKEN}")
    assert response.status_code == 303 and response.headers["Location"] == "/"
    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith(f"{auth.COOKIE}=")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert ADMIN_TOKEN not in cookie  # an HMAC of the token, not the token
    page = client.get("/")
    assert page.status_code == 200 and 'id="order-form"' in page.get_data(as_text=True)
    assert client.get("/api/queues").status_code == 200
    # The feed lives on orders-stream: the logged-in page is sent there (a 307).
    feed = client.get("/events/stream?x=1", buffered=False)
    assert feed.status_code == 307 and "/events/stream" in feed.headers["Location"]


def test_the_login_form_sets_the_cookie(client: FlaskClient) -> None:
    form = client.get("/login")
    assert form.status_code == 200 and 'type="password"' in form.get_data(as_text=True)
    assert client.post("/login", data={"token": "wrong"}).status_code == 401
    assert client.get("/api/queues").status_code == 401
    logged_in = client.post("/login", data={"token": ADMIN_TOKEN}, headers=SAME_ORIGIN)
    assert logged_in.status_code == 303
    assert client.get("/api/queues").status_code == 200


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 403),  # the cookie alone never changes anything
        ({"Origin": "null"}, 403),
        ({"Origin": "http://evil.example"}, 403),
        ({"Origin": "http://localhost:9999"}, 403),  # same site for SameSite, not same origin
        ({"Origin": "http://localhost"}, 404),  # allowed: no letter 0 in an empty queue
    ],
)
def test_a_change_by_cookie_needs_this_origin(
    client: FlaskClient, headers: dict[str, str], status: int
) -> None:
    client.get(f"/?token={ADMIN_TOKEN}")
    response = client.post("/api/queues/payment/dead-letters/0/discard", json={}, headers=headers)
    assert response.status_code == status, response.get_json()
    if status == 403:
        assert response.get_json()["errors"][0]["field"] == "Origin"


def test_bearer_changes_need_no_origin_but_a_foreign_one_is_refused(client: FlaskClient) -> None:
    url = "/api/queues/payment/dead-letters/0/discard"
    assert client.post(url, json={}, headers=ADMIN).status_code == 404
    foreign = client.post(url, json={}, headers={**ADMIN, "Origin": "http://evil.example"})
    assert foreign.status_code == 403
    posted = client.post("/orders", json=ORDER, headers={"Origin": "http://evil.example"})
    assert posted.status_code == 403  # and no order: a cross-site page cannot place one


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("localhost", True),
        ("localhost:8000", True),
        ("127.0.0.1:8000", True),
        ("[::1]:8000", True),
        ("LOCALHOST", True),
        ("evil.example", False),  # a rebinding attacker's name that resolves to 127.0.0.1
        ("evil.example:8000", False),
        ("localhost.evil.example", False),
        ("127.0.0.1:99999", False),
    ],
)
def test_host_allow_list_stops_dns_rebinding(client: FlaskClient, host: str, allowed: bool) -> None:
    for path in ("/healthz", "/orders", "/"):
        response = client.get(path, headers={"Host": host, **ADMIN})
        if allowed:
            assert response.status_code == 200, (host, path)
        else:
            assert response.status_code == 400, (host, path)
            assert response.get_json()["errors"][0]["field"] == "Host"


def test_configured_host_and_wildcard(tmp_path: Path, redis_url: str) -> None:
    shop = build_app(f"sqlite:///{tmp_path / 'a.db'}", redis_url, HOST="shop.internal")
    anyhost = build_app(f"sqlite:///{tmp_path / 'b.db'}", redis_url, ALLOWED_HOSTS="*")
    try:
        assert (
            shop.test_client().get("/healthz", headers={"Host": "shop.internal"}).status_code == 200
        )
        assert shop.test_client().get("/healthz", headers={"Host": "other"}).status_code == 400
        assert anyhost.test_client().get("/healthz", headers={"Host": "other"}).status_code == 200
    finally:
        shop.extensions["orders"].close()
        anyhost.extensions["orders"].close()


def test_every_html_page_has_the_security_headers(app: Flask, client: FlaskClient) -> None:
    order_id = client.post("/orders", json=ORDER).get_json()["id"]
    invoiced = envelope.envelope(
        envelope.INVOICE_ISSUED,
        {"order_id": order_id, "invoice_number": "INV-1", "total": "25.00", "currency": "EUR"},
        message="invoiced",
        sender="invoice-service",
        count=order_id,
    )
    with app.extensions["orders"].sessions.begin() as session:
        assert record_event(session, invoiced)
    pages = {
        "/": client.get("/", headers=ADMIN),
        "/login": client.get("/login"),
        "/?token=wrong": client.get("/?token=wrong"),
        "invoice": client.get(f"/orders/{order_id}/invoice"),
    }
    for name, page in pages.items():
        assert page.mimetype == "text/html", name
        assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"], name
        assert "unsafe-inline" not in page.headers["Content-Security-Policy"], name
        assert page.headers["X-Content-Type-Options"] == "nosniff", name
        assert page.headers["Referrer-Policy"] == "same-origin", name
        assert page.headers["X-Frame-Options"] == "DENY", name
    assert "a***@example.com" in pages["invoice"].get_data(as_text=True)


def test_without_admin_token_one_is_generated_and_logged(
    tmp_path: Path,
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ADMIN_TOKEN", raising=False)
    with caplog.at_level(logging.WARNING, logger="orders-api"):
        app = create_app({"DATABASE_URL": f"sqlite:///{tmp_path / 'o.db'}", "REDIS_URL": redis_url})
    try:
        create_schema(app.extensions["orders"].engine)
        [line] = [r.getMessage() for r in caplog.records if "ADMIN_TOKEN" in r.getMessage()]
        match = re.search(r"http://127\.0\.0\.1:8000/\?token=([A-Za-z0-9_-]{40,})", line)
        assert match, line
        client = app.test_client()
        assert client.get("/api/queues").status_code == 401  # never anonymous
        bearer = {"Authorization": f"Bearer {match.group(1)}"}
        assert client.get("/orders", headers=bearer).status_code == 200
    finally:
        app.extensions["orders"].close()


def test_orders_api_generates_one_token_for_all_its_workers(
    tmp_path: Path, redis_url: str, redis: redis_lib.Redis
) -> None:
    port = free_port()
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'orders.db'}",
        "REDIS_URL": redis_url,
        "PORT": str(port),
        "WEB_CONCURRENCY": "3",
        "ADMIN_TOKEN": "",
        "RELAY_IN_PROCESS": "0",
    }
    api = Proc([str(BIN / "orders-api")], env, tmp_path / "api.log")
    try:
        line = wait_for(
            lambda: next((x for x in api.lines() if "?token=" in x), None),
            timeout=30,
            message="the dashboard URL in the log",
        )
        token = line.rsplit("?token=", 1)[1].strip()
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _status(base + "/healthz") == 200, timeout=30, message="orders-api up")
        # Many requests land on every worker: each accepts the one logged token.
        statuses = {_status(base + "/api/queues", token) for _ in range(30)}
        assert statuses == {200}
        assert _status(base + "/api/queues") == 401
        assert sum("?token=" in x for x in api.lines()) == 1  # printed once
    finally:
        api.kill()


def _status(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


@pytest.mark.parametrize("letter", ["%C2%B2", "%D9%A3", "1%0A", "%00"])
def test_odd_dead_letter_ids_are_404_not_500(client: FlaskClient, letter: str) -> None:
    response = client.post(
        f"/api/queues/payment/dead-letters/{letter}/discard", json={}, headers=ADMIN
    )
    assert response.status_code == 404, response.get_data(as_text=True)


def test_wrong_tokens_are_throttled_per_client(
    tmp_path: Path, redis_url: str, redis: redis_lib.Redis
) -> None:
    app = build_app(
        f"sqlite:///{tmp_path / 'orders.db'}",
        redis_url,
        RATE_LIMIT_PER_MINUTE="0",
        AUTH_FAILURES_PER_MINUTE="3",
    )
    try:
        client = app.test_client()
        wrong = {"Authorization": "Bearer not-the-token-0123456789"}
        order_id = client.post("/orders", json=ORDER).get_json()["id"]
        for _ in range(3):
            assert client.get("/api/queues", headers=wrong).status_code == 401
        # The bucket is empty: 429, and no token is compared, not even the right one.
        for headers in (wrong, ADMIN):
            refused = client.get("/api/queues", headers=headers)
            assert refused.status_code == 429
            assert refused.content_type == "application/problem+json"
            assert refused.get_json()["type"].endswith("too-many-token-failures")
            assert int(refused.headers["Retry-After"]) == 20  # 3 a minute: one in 20 s
        # No oracle on the public API either (the email is unmasked for the operator).
        assert client.get(f"/orders/{order_id}", headers=ADMIN).status_code == 429
        # Where a person types it: the form, with the reason.
        form = client.post("/login", data={"token": ADMIN_TOKEN}, headers=SAME_ORIGIN)
        assert form.status_code == 429 and form.mimetype == "text/html"
        assert "Too many wrong tokens" in form.get_data(as_text=True)
        assert client.get(f"/?token={ADMIN_TOKEN}").status_code == 429
        # Anonymous requests are not affected, nor another client.
        assert client.get(f"/orders/{order_id}").status_code == 200
        other = app.test_client()
        other.environ_base["REMOTE_ADDR"] = "10.0.0.2"
        assert other.get("/api/queues", headers=ADMIN).status_code == 200
        assert other.get("/api/queues", headers=wrong).status_code == 401
        # A right token does not refill the bucket; the bucket refilling does.
        bucket = keys.auth_failures("127.0.0.1")
        assert redis.hget(bucket, "tokens") is not None
        redis.delete(bucket)
        assert client.get("/api/queues", headers=ADMIN).status_code == 200
        # A session cookie is never compared against the bucket (nothing to guess in it).
        logged_in = client.post("/login", data={"token": ADMIN_TOKEN}, headers=SAME_ORIGIN)
        assert logged_in.status_code == 303
        for _ in range(4):
            client.get("/api/queues", headers=wrong)
        assert client.get("/api/queues").status_code == 200  # by the cookie
    finally:
        app.extensions["orders"].close()
