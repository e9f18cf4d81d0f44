"""Every Redis key and channel name used by the Python processes.

Nothing else in the Python code builds a key string. The Go subscriber's defaults
(``go-subscriber/config.go``) name the same Hello keys and the order channel.

Queue keys carry a hash tag (``{payment}``): everything one queue touches in a single
command or Lua script lives in one Redis Cluster slot.
"""

from __future__ import annotations

HELLO_CHANNEL = "messages"
"""Pub/sub channel of the original Hello publisher."""

HELLO_QUEUE = "message_queue"
"""List of the original Hello publisher (RPUSH here, BLPOP in the Go subscriber)."""

ORDER_EVENTS_CHANNEL = "orders:events"
"""Pub/sub channel carrying every domain event (OrderPlaced and the outcomes): live only."""

PAYMENT_QUEUE = "payment"
"""Queue of the payment service (OrderPlaced)."""
INVOICE_QUEUE = "invoice"
"""Queue of the invoice service (PaymentCaptured)."""
SHIPPING_QUEUE = "shipping"
"""Queue of the shipping service (PaymentCaptured)."""
EMAIL_QUEUE = "email"
"""Queue of the email service (OrderPlaced, PaymentDeclined, ShipmentBooked)."""

CONSUMER_QUEUES: tuple[str, ...] = (PAYMENT_QUEUE, INVOICE_QUEUE, SHIPPING_QUEUE, EMAIL_QUEUE)
"""The consumer services' queues; which events go to which is ``events.ROUTES``."""

ORDER_UPDATES_QUEUE = "order-updates"
"""Queue of outcome events (PaymentCaptured, InvoiceIssued, ...) the order service records."""


QUEUE_KEYS_PATTERN = "queue:*"
"""Glob matching every key of every reliable queue (for ACLs and SCAN)."""


def _tag(queue: str) -> str:
    if not queue or any(c in queue for c in "{}: "):
        raise ValueError(f"invalid queue name {queue!r}")
    return f"queue:{{{queue}}}"


def pending(queue: str) -> str:
    """List of messages waiting to be taken (producers RPUSH, workers LMOVE from the left)."""
    return f"{_tag(queue)}:pending"


def express(queue: str) -> str:
    """List of express messages waiting: taken before ``pending`` (see messaging.queue)."""
    return f"{_tag(queue)}:express"


def express_streak(queue: str) -> str:
    """Counter: express messages taken in a row while standard work waited (anti-starvation)."""
    return f"{_tag(queue)}:express-streak"


def processing(queue: str, worker: str) -> str:
    """List of one worker's in-flight messages (the reliable-move target)."""
    return f"{_tag(queue)}:processing:{worker}"


def delayed(queue: str) -> str:
    """Sorted set of retries, scored by the UNIX time they become due."""
    return f"{_tag(queue)}:delayed"


def dead(queue: str) -> str:
    """List of dead letters (JSON: message, error, attempts, time)."""
    return f"{_tag(queue)}:dead"


def workers(queue: str) -> str:
    """Set of worker ids that have registered on the queue (the reaper scans it)."""
    return f"{_tag(queue)}:workers"


def heartbeat(queue: str, worker: str) -> str:
    """A worker's liveness key, refreshed with a TTL; gone = the worker is dead."""
    return f"{_tag(queue)}:heartbeat:{worker}"


def attempts(queue: str) -> str:
    """Hash: message id -> failed attempts so far."""
    return f"{_tag(queue)}:attempts"


def deaths(queue: str) -> str:
    """Hash: SHA-1 of a message's bytes -> workers that died holding it (counted at reap)."""
    return f"{_tag(queue)}:deaths"


def revivable(queue: str) -> str:
    """Sorted set of transient dead letters (their stored JSON), scored by the time
    they are next revived (put back on pending)."""
    return f"{_tag(queue)}:revivable"


def revive_tick(queue: str) -> str:
    """String with a one-second TTL: some worker revived dead letters this second."""
    return f"{_tag(queue)}:revive-tick"


def revive_probe(queue: str) -> str:
    """String living CONSUMER_REVIVE_SECONDS after the last revival (no canary needed)."""
    return f"{_tag(queue)}:revive-probe"


def revive_recovered(queue: str) -> str:
    """String set when a revived message was acked (its dependency is back): every
    transient dead letter is then due at once, at the revival's rate bound."""
    return f"{_tag(queue)}:revive-recovered"


def stats(queue: str) -> str:
    """Hash of counters: processed, failed, retried, dead, revived."""
    return f"{_tag(queue)}:stats"


NOOP_QUEUE = "noop"
"""Queue of the ``consumer noop`` worker (benchmarks and smoke tests only)."""


def rate_limit(client: str) -> str:
    """Hash of one client's token bucket (tokens, last refill time) for the API's rate limit.

    ``client`` is the remote IP address (IPv6 colons are fine in a key name).
    """
    if not client or any(c in client for c in "{} \r\n"):
        raise ValueError(f"invalid rate-limit client {client!r}")
    return f"ratelimit:{client}"


def auth_failures(client: str) -> str:
    """Hash of one client's bucket of failed operator-token attempts (AUTH_FAILURES_PER_MINUTE).

    ``client`` is the remote IP address, as for :func:`rate_limit`.
    """
    return "authfail:" + rate_limit(client).removeprefix("ratelimit:")


def stream_ticket(ticket: str) -> str:
    """String whose existence lets one dashboard page open the live feed (orders-stream)."""
    return f"stream-ticket:{ticket}"


RECONCILE_KEYS_PATTERN = "reconcile:*"
"""Every key of the automatic reconciliation (its lock, its per-order marks)."""

RECONCILE_LOCK = "reconcile:lock"
"""String held (SET NX PX) by the relay that runs this interval's reconciliation pass."""


def reconciled(order_id: int) -> str:
    """String (with a TTL) marking an order re-published by reconciliation recently."""
    if isinstance(order_id, bool) or not isinstance(order_id, int) or order_id < 0:
        raise ValueError(f"invalid order id {order_id!r}")
    return f"reconcile:order:{order_id}"
