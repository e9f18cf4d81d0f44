"""A per-client token bucket in Redis: the API's rate limit (RATE_LIMIT_PER_MINUTE).

Each client IP has a bucket of ``per_minute`` tokens (so a burst of that many requests
is fine) that refills at ``per_minute / 60`` tokens a second. One Lua script reads,
refills, takes a token and writes the bucket back, so several gunicorn workers and
several API hosts share one limit without races. The script uses the Redis server's
clock (``TIME``), not the callers', so API hosts with skewed clocks agree. The bucket
expires once it would be full again: an idle client costs no memory.

Fail-open: when Redis does not answer, the request is allowed. The limit protects the
service; it must not take order intake down with it (orders are accepted while Redis
is away and the outbox relay publishes them later). After a failure the limiter is not
asked again for :data:`FAIL_OPEN_SECONDS`, and then by one request at a time until Redis
answers, so a Redis outage does not add a timeout to every request. Its client
(``OrderServices.guard``) gives up after half a second, once: a Redis that hangs
instead of refusing costs one request that long per second, not every request ten.

The client is ``request.remote_addr``: behind a reverse proxy, put werkzeug's
``ProxyFix`` in front so that it is the real client, or every client shares one bucket.

The same bucket, under another key (``key``), counts failed operator-token attempts
(orders.auth, AUTH_FAILURES_PER_MINUTE): :meth:`RateLimiter.peek` asks whether a token
is left without taking it, and only a failure takes one.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
from redis.commands.core import Script

from messaging import keys

log = logging.getLogger("orders-api")

FAIL_OPEN_SECONDS = 1.0
"""After a Redis error, requests skip the limiter for this long."""

TOKEN_BUCKET = """
-- KEYS[1]: the bucket hash; ARGV[1]: capacity (tokens); ARGV[2]: refill (tokens/s);
-- ARGV[3]: '0' only looks (nothing is taken or written), otherwise one token is taken.
-- Returns {allowed 0/1, seconds until a token is there (string), tokens left (string)}.
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(bucket[1]) or capacity
local ts = tonumber(bucket[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - ts) * rate)
local allowed = 0
local wait = 0
if tokens >= 1 then
  allowed = 1
else
  wait = (1 - tokens) / rate
end
if ARGV[3] == '0' then
  return {allowed, tostring(wait), tostring(tokens)}
end
if allowed == 1 then tokens = tokens - 1 end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - tokens) / rate * 1000) + 1000)
return {allowed, tostring(wait), tostring(tokens)}
"""


@dataclass(frozen=True)
class Decision:
    """What the limiter decided for one request."""

    allowed: bool
    retry_after: int
    """Whole seconds until the client may try again (0 when allowed)."""
    remaining: int
    """Whole tokens left in the bucket (-1 when the limiter was skipped)."""


ALLOW = Decision(True, 0, -1)


class RateLimiter:
    """Token buckets per client on Redis; ``per_minute=0`` allows everything."""

    def __init__(
        self,
        client: redis.Redis,
        per_minute: int,
        key: Callable[[str], str] = keys.rate_limit,
    ) -> None:
        self.client = client
        self.per_minute = per_minute
        self.key = key
        """The bucket's Redis key for a client IP."""
        self._script: Script | None = None  # registered on first use: nothing connects here
        self._skip_until = 0.0
        self._failing = False
        """Redis did not answer the last check: skip it, then let one request probe."""
        self._probing = False
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """False when RATE_LIMIT_PER_MINUTE is 0."""
        return self.per_minute > 0

    def check(self, client_ip: str | None) -> Decision:
        """Take one token for ``client_ip``; fail open when Redis does not answer."""
        return self._bucket(client_ip, take=True)

    def peek(self, client_ip: str | None) -> Decision:
        """Whether ``client_ip`` has a token left, taking none; fails open like :meth:`check`."""
        return self._bucket(client_ip, take=False)

    def _bucket(self, client_ip: str | None, *, take: bool) -> Decision:
        if not self.per_minute or not client_ip:
            return ALLOW
        if time.monotonic() < self._skip_until:
            return ALLOW
        probe = False
        if self._failing:  # one request probes whether Redis is back; the others pass
            with self._lock:
                if self._probing:
                    return ALLOW
                self._probing = probe = True
        try:
            if self._script is None:
                self._script = self.client.register_script(TOKEN_BUCKET)
            allowed, wait, left = self._script(
                keys=[self.key(client_ip)],
                args=[self.per_minute, self.per_minute / 60, "1" if take else "0"],
            )
        except (redis.RedisError, OSError) as exc:
            with self._lock:
                if not self._failing:
                    log.warning("Rate limiter unavailable, allowing requests: %s", exc)
                self._failing = True
                self._skip_until = time.monotonic() + FAIL_OPEN_SECONDS
            return ALLOW
        except ValueError:  # not an address we can key on: do not limit it
            return ALLOW
        finally:
            if probe:  # whatever happened, the next request may probe (none stays stuck)
                with self._lock:
                    self._probing = False
        if self._failing:
            with self._lock:
                if self._failing:
                    log.warning("Rate limiter available again")
                self._failing = False
        if int(allowed):
            return Decision(True, 0, int(float(left)))
        return Decision(False, max(1, math.ceil(float(wait))), 0)
