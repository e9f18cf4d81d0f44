"""orders.ratelimit.RateLimiter while Redis is away: one probe at a time, never stuck.

The limiter's script is replaced by a function that fails the way Redis or a bug would:
no server is needed to check who asks Redis and when.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis

from orders.ratelimit import RateLimiter


class Script:
    """Stands in for the registered token-bucket script; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail: BaseException | None = None

    def __call__(self, **_: Any) -> list[str]:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        return ["1", "0", "59"]


@pytest.fixture
def limiter() -> tuple[RateLimiter, Script]:
    script = Script()
    found = RateLimiter(redis.Redis(port=1), per_minute=60)
    found._script = script  # type: ignore[assignment]
    return found, script


def test_redis_away_fails_open_then_one_probe_finds_it_back(
    limiter: tuple[RateLimiter, Script],
) -> None:
    found, script = limiter
    script.fail = redis.TimeoutError("Timeout reading from socket")
    assert found.check("192.0.2.1").allowed
    assert found.check("192.0.2.1").allowed  # within the pause: Redis is not asked
    assert script.calls == 1
    found._skip_until = 0.0  # the pause is over
    script.fail = None
    assert found.check("192.0.2.1").remaining == 59  # the probe: Redis is back, counted
    assert found.check("192.0.2.1").remaining == 59
    assert script.calls == 3


def test_a_probe_that_fails_unexpectedly_leaves_the_next_request_to_probe(
    limiter: tuple[RateLimiter, Script],
) -> None:
    found, script = limiter
    script.fail = redis.ConnectionError("refused")
    found.check("192.0.2.1")
    found._skip_until = 0.0
    script.fail = RuntimeError("a bug in the probe")
    with pytest.raises(RuntimeError):
        found.check("192.0.2.1")
    script.fail = None
    assert found.check("192.0.2.1").remaining == 59  # probed again, not skipped forever
    assert script.calls == 3
