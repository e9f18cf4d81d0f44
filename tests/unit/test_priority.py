"""Priority without Redis: what counts as express, inheritance, and bad settings.

The queue's scripts (lanes, the streak rule) need a real Redis: see
``tests/integration/test_priority.py``.
"""

from __future__ import annotations

from typing import Any

import fakeredis
import pytest

from messaging import envelope
from messaging.config import ConfigError, WorkerSettings
from messaging.queue import RedisQueue


def placed(priority: str = "standard") -> dict[str, Any]:
    return envelope.envelope(
        envelope.ORDER_PLACED, {"order_id": 1}, message="m", sender="t", count=1,
        priority=priority,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("event", "express"),
    [
        (placed("express"), True),
        (placed(), False),
        (envelope.dumps(placed("express")), True),
        (envelope.dumps(placed("express")).encode(), True),
        (envelope.dumps(placed()), False),
        ('{"priority": "express"}', True),  # spaces: decoded, not matched by bytes
        ('{"data": {"priority": "express"}}', False),  # only the envelope's counts
        ('{"priority": "express"', False),  # not JSON
        (b"\xff\xfe", False),
        ('["express"]', False),
    ],
    # Fixed ids: an envelope's id and time differ in each xdist worker's collection.
    ids="dict dict-standard text bytes text-standard spaced nested not-json not-utf8 list".split(),
)
def test_what_is_express(event: Any, express: bool) -> None:
    assert envelope.is_express(event) is express


def test_standard_leaves_the_field_out_and_an_unknown_priority_is_refused() -> None:
    assert "priority" not in placed()
    assert placed("express")["priority"] == "express"
    with pytest.raises(ValueError, match="unknown priority"):
        placed("urgent")


def test_outcomes_inherit_express_and_only_express() -> None:
    outs = [placed(), placed()]
    envelope.inherit_priority(outs, placed())
    assert all("priority" not in o for o in outs)
    envelope.inherit_priority(outs, placed("express"))
    assert [o["priority"] for o in outs] == ["express", "express"]


def test_the_ratio_must_be_at_least_one() -> None:
    with pytest.raises(ValueError, match="express_ratio"):
        RedisQueue(fakeredis.FakeRedis(), "q", express_ratio=0)
    assert WorkerSettings.from_env({}).express_ratio == 10
    assert WorkerSettings.from_env({"CONSUMER_EXPRESS_RATIO": "3"}).express_ratio == 3
    with pytest.raises(ConfigError, match="CONSUMER_EXPRESS_RATIO"):
        WorkerSettings.from_env({"CONSUMER_EXPRESS_RATIO": "0"})
