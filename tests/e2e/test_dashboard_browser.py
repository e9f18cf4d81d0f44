"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright)
against the real stack: place an order in the form, watch it in the live feed and see it
reach ``completed`` without a reload; untrusted event text stays text; the feed comes
back after Redis restarts; discard asks first (cancel keeps the dead letter). Screenshots
go to ``test-artifacts/`` (``dashboard*.png``).

Chromium is the system's (``apt-get install chromium``); Playwright never downloads a
browser here. Missing locally: skipped. Missing in CI (``CI`` set): failed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib

from messaging import keys, monitor
from messaging.queue import RedisQueue
from tests.e2e.conftest import Stack
from tests.helpers import wait_for

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
XSS = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">'
TIMEOUT_MS = 30_000


def _missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"the browser test needs {reason} in CI")
    pytest.skip(f"no {reason}")


@pytest.fixture
def page(stack: Stack) -> Iterator[Any]:
    """A Chromium page on the dashboard (console errors collected in page.errors)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("Python package playwright (pip install -e '.[dev]')")
    if not (Path(CHROMIUM).exists() or shutil.which("chromium")):
        _missing(f"chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on(
                "console",
                lambda msg: errors.append(msg.text) if msg.type == "error" else None,
            )
            page.errors = errors
            # As an operator does with the URL orders-api logs: the token once, then a cookie.
            page.goto(f"{stack.base_url}/?token={stack.admin_token}")
            assert page.url == stack.base_url + "/", "the token left the address bar"
            page.wait_for_selector("#stream-state.live")
            yield page
        finally:
            browser.close()


def _subscribers(stack: Stack) -> int:
    client = redis_lib.Redis.from_url(stack.redis.url)
    try:
        return int(client.pubsub_numsub(keys.ORDER_EVENTS_CHANNEL)[0][1])
    except redis_lib.ConnectionError:
        return 0
    finally:
        client.close()


def test_place_an_order_and_watch_it_complete(page: Any, stack: Stack) -> None:
    page.fill("input[name=customer_email]", "grace@example.com")
    page.fill("input[name=quantity]", "3")
    page.click("button[type=submit]")
    page.wait_for_selector("#order-result[data-order-id]")
    order_id = page.get_attribute("#order-result", "data-order-id")
    assert page.text_content("#order-result") == f"placed order #{order_id} (37.50 EUR)"

    # The live feed: OrderPlaced, then every outcome of the choreography, as published.
    for event_type in (
        "OrderPlaced",
        "PaymentCaptured",
        "InvoiceIssued",
        "ShipmentBooked",
        "CustomerNotified",
    ):
        page.wait_for_selector(f'#feed-list li[data-type="{event_type}"][data-order="{order_id}"]')
    # Recent orders: polled, no reload, until the status is final.
    status = f'#order-rows tr[data-order-id="{order_id}"] td[data-field=status]'
    page.wait_for_selector(f"{status}.status-completed")
    assert page.text_content(status) == "completed"
    row = page.text_content(f'#order-rows tr[data-order-id="{order_id}"]')
    assert "grace@example.com" in row and "PaymentCaptured" in row

    # The queue table follows: each queue processed this order's event.
    # (Python polls: Playwright's wait_for_function evals, which the page's CSP forbids.)
    processed = "#queue-rows tr[data-queue=payment] td[data-field=processed]"
    wait_for(lambda: page.text_content(processed) == "1", 15, 0.1, "payment processed 1")
    alive = page.text_content("#queue-rows tr[data-queue=payment] td[data-field=workers_alive]")
    assert alive == "1 / 1"

    # Untrusted event text is shown as text, never run.
    client = redis_lib.Redis.from_url(stack.redis.url)
    try:
        event = {"type": "OrderPlaced", "message": XSS, "data": {"order_id": 999}}
        client.publish(keys.ORDER_EVENTS_CHANNEL, json.dumps(event))
        client.publish(keys.ORDER_EVENTS_CHANNEL, XSS)  # not even JSON
    finally:
        client.close()
    page.wait_for_selector('#feed-list li[data-order="999"]')
    page.wait_for_selector('#feed-list li[data-type="raw"]')
    assert "<script>window.__xss=1</script>" in page.text_content('#feed-list li[data-order="999"]')
    assert XSS in page.text_content('#feed-list li[data-type="raw"]')
    assert page.evaluate("typeof window.__xss") == "undefined"
    assert page.query_selector("#feed-list script, #feed-list img") is None

    # The real processes' metrics: the API's workers add up, the consumer measured it.
    scrape = urllib.request.Request(
        stack.base_url + "/metrics", headers={"Authorization": f"Bearer {stack.admin_token}"}
    )
    with urllib.request.urlopen(scrape, timeout=10) as response:
        api_metrics = response.read().decode()
    assert re.search(r"^orders_placed_total 1\.0$", api_metrics, re.MULTILINE)
    assert 'orders_queue_processed_total{queue="payment"} 1.0' in api_metrics
    with urllib.request.urlopen(stack.payment_metrics, timeout=10) as response:
        consumer_metrics = response.read().decode()
    assert (
        'consumer_end_to_end_seconds_count{queue="payment",type="OrderPlaced"} 1.0'
        in consumer_metrics
    )
    assert 'consumer_events_total{outcome="handled",queue="payment"} 1.0' in consumer_metrics

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    assert page.errors == [], page.errors


def test_feed_reconnects_after_a_redis_restart(page: Any, stack: Stack) -> None:
    wait_for(lambda: _subscribers(stack) == 1, message="the page's subscription")
    stack.redis.kill()
    page.wait_for_selector("#stream-state.down")
    stack.redis.start()
    # EventSource reconnects by itself; the server subscribes again.
    page.wait_for_selector("#stream-state.live")
    wait_for(lambda: _subscribers(stack) == 1, timeout=30, message="a new subscription")
    client = redis_lib.Redis.from_url(stack.redis.url)
    try:
        client.publish(keys.ORDER_EVENTS_CHANNEL, "after the restart")
    finally:
        client.close()
    wait_for(
        lambda: "after the restart" in page.text_content("#feed-list"),
        30,
        0.1,
        "the event published after the restart in the feed",
    )
    # The page was never reloaded: the feed-since stamp is still the first one.
    assert page.evaluate("performance.getEntriesByType('navigation').length") == 1


def _order_ids(stack: Stack) -> list[int]:
    listing = urllib.request.Request(
        stack.base_url + "/orders?limit=100",
        headers={"Authorization": f"Bearer {stack.admin_token}"},
    )
    with urllib.request.urlopen(listing, timeout=10) as response:
        return [int(o["id"]) for o in json.loads(response.read())["items"]]


def test_a_double_click_and_a_retry_make_one_order(page: Any, stack: Stack) -> None:
    keys_sent: list[str | None] = []
    lost: list[str] = []

    def on_orders(route: Any) -> None:
        request = route.request
        if request.method != "POST":
            route.continue_()
            return
        keys_sent.append(request.headers.get("idempotency-key"))
        if not lost:
            # The server places the order, the answer never reaches the page.
            lost.append(route.fetch().text())
            route.abort("connectionreset")
        else:
            route.continue_()

    page.route(re.compile(r".*/orders$"), on_orders)
    before = _order_ids(stack)
    page.dblclick("button[type=submit]")
    page.wait_for_selector("#order-result.error")  # the answer was lost: "rejected: ..."
    assert page.is_enabled("button[type=submit]")
    page.click("button[type=submit]")  # the user retries the same submission
    page.wait_for_selector("#order-result[data-order-id]")
    order_id = int(page.get_attribute("#order-result", "data-order-id") or 0)
    assert json.loads(lost[0])["id"] == order_id  # the retry got the lost order back
    new = [i for i in _order_ids(stack) if i not in before]
    assert new == [order_id], "one order for a double click and a retry"
    assert len(keys_sent) == 2 and keys_sent[0] and keys_sent[0] == keys_sent[1], keys_sent

    # Placed: the next submit is a new order with a new key; editing the form also renews it.
    page.click("button[type=submit]")
    page.wait_for_selector(f"#order-result[data-order-id]:not([data-order-id='{order_id}'])")
    assert len(keys_sent) == 3 and keys_sent[2] != keys_sent[0]
    assert len([i for i in _order_ids(stack) if i not in before]) == 2


def test_the_dashboard_needs_the_token(page: Any, stack: Stack) -> None:
    other = page.context.browser.new_context()
    try:
        anonymous = other.new_page()
        anonymous.goto(stack.base_url + "/")
        anonymous.wait_for_selector("input[name=token][type=password]")
        assert anonymous.query_selector("#order-form") is None
        anonymous.fill("input[name=token]", "wrong-token-0123456789")
        anonymous.click("button[type=submit]")
        anonymous.wait_for_selector("output.error")
        anonymous.fill("input[name=token]", stack.admin_token)
        anonymous.click("button[type=submit]")
        anonymous.wait_for_selector("#stream-state.live")
        assert anonymous.url == stack.base_url + "/"
        cookie = next(c for c in other.cookies() if c["name"] == "orders_admin")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert anonymous.evaluate("document.cookie") == ""  # no script can read it
    finally:
        other.close()


def test_time_views_multi_line_form_and_phone_width(page: Any, stack: Stack) -> None:
    """Two lines in the form; the order's timeline with step latencies; the stage table
    and the uPlot charts; links to detail and invoice; a layout that fits 390 px."""
    page.click("#add-line")
    lines = page.query_selector_all("#lines .line")
    assert len(lines) == 2
    lines[1].query_selector("input[name=sku]").fill("PEN-7")
    lines[1].query_selector("input[name=quantity]").fill("2")
    lines[1].query_selector("input[name=unit_price]").fill("3.20")
    page.click("button[type=submit]")
    page.wait_for_selector("#order-result[data-order-id]")
    order_id = page.get_attribute("#order-result", "data-order-id")
    assert page.text_content("#order-result") == f"placed order #{order_id} (18.90 EUR)"

    row = f'#order-rows tr[data-order-id="{order_id}"]'
    page.wait_for_selector(f"{row} td[data-field=status].status-completed")
    page.wait_for_selector(f"{row} a.invoice-link")
    assert page.get_attribute(f"{row} a.invoice-link", "href") == f"/orders/{order_id}/invoice"
    page.click(f"{row} a.order-link")
    page.wait_for_selector(f'#order-detail[data-order-id="{order_id}"]')
    for event_type in ("OrderPlaced", "PaymentCaptured", "InvoiceIssued"):
        page.wait_for_selector(f'#timeline-rows tr[data-type="{event_type}"]')
    step = page.text_content('#timeline-rows tr[data-type="PaymentCaptured"] td[data-field=step]')
    assert re.fullmatch(r"[0-9,]+ ms", step or ""), step
    assert len(page.query_selector_all("#detail-lines tr")) == 2

    # Time per stage: the table and three charts drawn by the vendored uPlot.
    wait_for(
        lambda: page.query_selector('#stage-rows tr[data-stage="PaymentCaptured"]') is not None,
        30, 0.2, "the stage table",
    )  # fmt: skip
    p99 = page.text_content('#stage-rows tr[data-stage="PaymentCaptured"] td[data-field=p99]')
    assert re.fullmatch(r"[0-9,]+ ms", p99 or ""), p99
    for chart in ("chart-throughput", "chart-latency", "chart-depth"):
        page.wait_for_selector(f"#{chart} .uplot canvas")

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-1280.png"), full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    page.evaluate("window.dispatchEvent(new Event('resize'))")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page is {width} px wide at 390 px"
    page.screenshot(path=str(ARTIFACTS / "dashboard-390.png"), full_page=True)
    assert page.errors == [], page.errors


def test_discard_asks_first_cancel_keeps_the_dead_letter_confirm_deletes_it(
    page: Any, stack: Stack
) -> None:
    """Discard deletes a dead letter for good, so the page asks: cancel keeps it (no
    request is sent), confirm deletes that one letter and leaves the other."""
    client = redis_lib.Redis.from_url(stack.redis.url)
    queue = RedisQueue(client, "payment")
    try:
        # Garbage on the payment queue: the real payment consumer dead-letters it.
        queue.push(b"garbage one: not an event", b"garbage two: not an event")
        wait_for(lambda: len(queue.dead_letters()) == 2, 60, 0.1, "two dead letters")
        ids = {letter.message: monitor.letter_id(letter.entry) for letter in queue.dead_letters()}
        keep, drop = ids["garbage one: not an event"], ids["garbage two: not an event"]

        posts: list[str] = []
        page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
        dialogs: list[str] = []

        def answer(accept: bool) -> Callable[[Any], None]:
            def handle(dialog: Any) -> None:
                dialogs.append(dialog.message)
                if accept:
                    dialog.accept()
                else:
                    dialog.dismiss()

            return handle

        # Locators, not element handles: the list is re-rendered every poll.
        row = '#dead-list .dead-queue[data-queue=payment] tr[data-letter="{}"]'
        discard = row + " button[data-action=discard]"
        page.wait_for_selector(row.format(keep))
        page.wait_for_selector(row.format(drop))

        page.once("dialog", answer(False))
        page.locator(discard.format(keep)).click()
        wait_for(lambda: len(dialogs) == 1, 30, 0.05, "the confirmation for the first letter")
        assert dialogs[0] == (
            f"Discard dead letter {keep} of payment for good? It cannot be requeued afterwards."
        )
        ARTIFACTS.mkdir(exist_ok=True)
        page.locator("#dead").screenshot(path=str(ARTIFACTS / "dashboard-discard-cancelled.png"))

        page.once("dialog", answer(True))
        page.locator(discard.format(drop)).click()
        wait_for(lambda: len(dialogs) == 2, 30, 0.05, "the confirmation for the second letter")
        assert drop in dialogs[1]
        wait_for(
            lambda: [monitor.letter_id(x.entry) for x in queue.dead_letters()] == [keep],
            30, 0.1, "the confirmed letter deleted, the cancelled one kept",
        )  # fmt: skip
        page.wait_for_selector(row.format(drop), state="detached")
        page.wait_for_selector(row.format(keep))
        # Only the confirmed discard reached the server (the cancelled one sent nothing,
        # and it was clicked first, so any request of its would be in the list by now).
        assert [u for u in posts if "/dead-letters/" in u] == [
            f"{stack.base_url}/api/queues/payment/dead-letters/{drop}/discard"
        ], posts
        page.locator("#dead").screenshot(path=str(ARTIFACTS / "dashboard-discard-confirmed.png"))
    finally:
        client.close()
    assert page.errors == [], page.errors
