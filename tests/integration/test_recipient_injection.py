"""Recipient injection (issue 14, item 1) against the real email consumer and smtp-sink.

An OrderPlaced on the email queue may not have come through ``POST /orders`` (a replay,
a bug, someone with queue access). Whatever its ``customer_email`` says, the consumer
mails at most the one address it names, and a string that is not exactly one plain
address is dead-lettered with the reason and mailed to nobody. On main before the fix,
smtplib took the recipients from the ``To:`` header: one string reached nine mailboxes.
"""

from __future__ import annotations

import email
import json
import re
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib

from devtools.redis_server import free_port
from messaging import envelope, keys
from messaging.queue import RedisQueue
from tests.helpers import BIN, Proc, wait_for

ATTACKS = [
    # The string: one encoded-word plus a list, nine addresses on main.
    "=?utf-8?q?v0=40evil.example?=,"
    + ",".join(f"v{n}@evil.example" for n in range(1, 8))
    + ",x@example.com",
    "root,ada@example.com",  # also mailed the local user root
    "root",
    "ada@example.com, spy@evil.example",
    "Ada <spy@evil.example>",
    '"spy@evil.example" <ada@example.com>',
    "=?utf-8?q?spy=40evil.example?=@example.com",
    "ada@example.com\nBcc: spy@evil.example",
    "ada@example.com\n",
    "ada@example.com (spy@evil.example)",
    "spy@[127.0.0.1]",
    "ada\x00@example.com",
    "\x1b[31mada@example.com",
]
GOOD = "grace@example.com"


def order_placed(order_id: int, email_to: str) -> dict[str, Any]:
    return envelope.envelope(
        envelope.ORDER_PLACED,
        {
            "order_id": order_id,
            "customer_email": email_to,
            "currency": "EUR",
            "lines": [{"sku": "BOOK-1", "quantity": 1, "unit_price": "3.50", "line_total": "3.50"}],
            "total": "3.50",
        },
        message=f"Order #{order_id} placed",
        sender="orders-api",
        count=order_id,
    )


def envelope_recipients(log: Path) -> list[str]:
    """Every RCPT TO smtp-sink accepted, from its one log line per stored message."""
    found: list[str] = []
    for match in re.finditer(
        r"smtp-sink: stored \S+ from \S* to (.*?) \(Message-ID", log.read_text()
    ):
        found += match.group(1).split(",")
    return found


@pytest.mark.timeout(120)
def test_hostile_addresses_from_the_queue_reach_nobody(
    tmp_path: Path, redis: redis_lib.Redis, redis_url: str
) -> None:
    port = free_port()
    mail_dir = tmp_path / "mail"
    sink = Proc(
        [str(BIN / "smtp-sink")],
        {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(port), "SMTP_SINK_DIR": str(mail_dir)},
        tmp_path / "sink.log",
    )
    procs = [sink]
    try:
        sink.wait_output("smtp-sink: listening")
        client = redis_lib.Redis.from_url(redis_url)
        queue = RedisQueue(client, "email")
        for n, address in enumerate(ATTACKS, start=1):
            queue.push(envelope.dumps(order_placed(n, address)))
        queue.push(envelope.dumps(order_placed(100, GOOD)))
        consumer = Proc(
            [str(BIN / "consumer"), "email"],
            {
                "REDIS_URL": redis_url,
                "EMAIL_DATABASE_URL": f"sqlite:///{tmp_path / 'email.db'}",
                "REDIS_CONNECT_ATTEMPTS": "1",
                "CONSUMER_BACKOFF_BASE": "0.05",
                "CONSUMER_BACKOFF_MAX": "0.1",
                "SMTP_HOST": "127.0.0.1",
                "SMTP_PORT": str(port),
            },
            tmp_path / "email.log",
        )
        procs.append(consumer)
        wait_for(
            lambda: (
                len(list(mail_dir.glob("*.eml"))) >= 1 and len(queue.dead_letters()) >= len(ATTACKS)
            ),
            timeout=60,
            message="the good order mailed and every hostile one dead-lettered",
        )
        letters = queue.dead_letters()
        assert len(letters) == len(ATTACKS)
        # Permanent at the first attempt: a reason, no retries that could mail later.
        wrong = [
            (x.attempts, x.error[-80:])
            for x in letters
            if x.attempts != 1
            or not re.search("refused recipient|invalid .*customer_email", x.error)
        ]
        assert wrong == []
        dead_orders = sorted(json.loads(x.message)["data"]["order_id"] for x in letters)
        assert dead_orders == list(range(1, len(ATTACKS) + 1))
        sink.wait_output("smtp-sink: stored")  # logged just after the file is written
        assert envelope_recipients(tmp_path / "sink.log") == [GOOD]
        [eml] = list(mail_dir.glob("*.eml"))
        msg = email.message_from_bytes(eml.read_bytes(), policy=default_policy)
        assert msg.get_all("To") == [GOOD] and msg.get_all("Bcc") is None
        key = keys.pending(keys.ORDER_UPDATES_QUEUE)
        updates = wait_for(
            lambda: [json.loads(m) for m in client.lrange(key, 0, -1)],
            message="the CustomerNotified of the good order",
        )
        assert [(u["type"], u["data"]["order_id"], u["data"]["step"]) for u in updates] == [
            (envelope.CUSTOMER_NOTIFIED, 100, "received")
        ]
        client.close()
    finally:
        for proc in procs:
            proc.kill()
