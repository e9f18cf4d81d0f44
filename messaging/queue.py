"""A reliable Redis queue: at-least-once delivery, retries with backoff, dead letters.

Layout of one queue ``q`` (every key comes from :mod:`messaging.keys`, all in one hash
slot thanks to the ``{q}`` tag):

- ``pending(q)`` list: producers RPUSH JSON envelopes; workers take from the left.
- ``express(q)`` list: express messages (envelope ``"priority": "express"``) that
  arrived while standard work waited. Workers take from it first; after
  CONSUMER_EXPRESS_RATIO express messages in a row (``express_streak(q)`` counts them
  across takes) they take one standard message while both lists hold work, so express
  traffic never starves standard work (Sidekiq's and asynq's weighted queues, with the
  weight as a streak). An express message that finds pending empty has nothing to jump
  and goes to pending itself: a worker waiting in BLMOVE (which watches one list) gets
  it at once, and no worker ever waits while express work is there. Every script that
  puts a message back (reap, release, promote, requeue) applies the same rule, so a
  crash, a retry or a requeued dead letter keeps the message's priority.
- ``processing(q, worker)`` list per worker: a message is moved here atomically when
  taken (LMOVE/BLMOVE, the reliable-queue pattern) and removed only by an ack, a retry,
  a dead-letter or a release. A crash leaves it here; nothing is lost.
- ``workers(q)`` set + ``heartbeat(q, worker)`` key with a TTL: a worker whose
  heartbeat is gone is dead, and :meth:`RedisQueue.reap` moves its processing list back
  to the head of pending (Lua, atomic) and forgets it.
- ``delayed(q)`` sorted set scored by due time: retries wait here;
  :meth:`RedisQueue.promote` moves due ones back to pending (Lua, atomic). Due times
  are scored and compared on Redis's clock (``TIME`` inside the scripts), never a
  worker's: one worker an hour ahead would otherwise promote every retry at once (no
  backoff for anyone), one an hour behind would park its retries for an hour.
- ``attempts(q)`` hash event id -> failed attempts; ``dead(q)`` list of JSON dead
  letters; ``stats(q)`` hash of counters (processed, failed, retried, dead).
- ``deaths(q)`` hash SHA-1 of the message -> workers that died holding it. The reaper
  counts one for every message it takes back from a dead worker (as Sidekiq Pro's
  super_fetch counts recoveries). A message with a count is a *suspect*: the take
  script hands it out alone, never in a batch, so a message that kills its worker does
  not take innocent batch-mates down with it again (they were returned with it by the
  reaper, and are taken again on their own), and its count is its own. A suspect that
  has killed CONSUMER_MAX_CRASHES workers is dead-lettered when it is next taken, with
  the reason "worker died N times handling it". An ack or a dead letter forgets it.

Every state change that touches two keys is one Lua script, and every script first
removes the message from the worker's processing list and does nothing else if it was
not there (the reaper got it first): a message is never in two places, so a retry or
a release cannot duplicate it. Messages are bytes end to end, so garbage that is not
UTF-8 is dead-lettered like any other malformed message.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import random
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import redis

from messaging import envelope, keys
from messaging.logs import utc_now_iso

log = logging.getLogger(__name__)

DEFAULT_MAX_ATTEMPTS = 5
"""Failed attempts before a message is dead-lettered (CONSUMER_MAX_ATTEMPTS)."""
DEFAULT_MAX_CRASHES = 5
"""Workers a message may kill before it is dead-lettered (CONSUMER_MAX_CRASHES)."""
DEFAULT_BACKOFF_BASE = 1.0
"""Seconds of the first retry's maximum delay; doubles with each attempt."""
DEFAULT_BACKOFF_MAX = 60.0
"""Cap of the retry delay in seconds."""
PROMOTE_LIMIT = 1000
"""Most delayed messages one promoter call moves (it runs again on the next tick)."""
DEFAULT_EXPRESS_RATIO = 10
"""Express messages taken in a row, while standard work waits, before one standard
message is (CONSUMER_EXPRESS_RATIO): standard work keeps at least 1/11 of the takes."""


class RetryableError(Exception):
    """A failure that may go away: retry with backoff (gateway timeout, SMTP down)."""


class PermanentError(Exception):
    """A failure that a retry cannot fix (invalid data): dead-letter at once."""


class MalformedMessage(PermanentError):
    """The raw message is not an envelope this queue accepts."""


def classify(exc: BaseException) -> Literal["retry", "dead"]:
    """Decide what a handler failure means for the message.

    Permanent errors (including malformed messages) go to the dead letters at once;
    anything else is retried until the attempts run out, as Dramatiq does: an
    unexpected exception may be a passing condition (a locked database, a network
    blip), and a bug still ends in the dead letters after the last attempt.
    """
    return "dead" if isinstance(exc, PermanentError) else "retry"


def backoff(
    attempt: int,
    base: float = DEFAULT_BACKOFF_BASE,
    cap: float = DEFAULT_BACKOFF_MAX,
    rand: Callable[[], float] = random.random,
) -> float:
    """Delay before retry number ``attempt`` (1 = after the first failure), in seconds.

    Exponential with full jitter (uniform between 0 and ``min(cap, base * 2**(n-1))``),
    so workers that failed together do not retry together.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    ceiling = min(cap, base * 2 ** min(attempt - 1, 62))
    return ceiling * rand()


def parse(raw: bytes, accepted: Collection[str]) -> dict[str, Any]:
    """Decode and check one envelope; raise :class:`MalformedMessage` with the reason."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedMessage("message is not UTF-8") from None
    try:
        event = json.loads(text)
    except ValueError as exc:
        raise MalformedMessage(f"message is not JSON: {exc}") from None
    except RecursionError:  # hostile nesting ([[[[...]]]]) deeper than the parser's stack
        raise MalformedMessage("message is JSON nested too deeply") from None
    if not isinstance(event, dict):
        raise MalformedMessage(f"message is a JSON {type(event).__name__}, not an object")
    for field in ("id", "type"):
        if not isinstance(event.get(field), str) or not event[field]:
            raise MalformedMessage(f"message has no {field}")
    if event["type"] not in accepted:
        raise MalformedMessage(f"unknown event type {event['type']!r} for this queue")
    if event.get("version") != envelope.VERSION:
        raise MalformedMessage(
            f"unsupported version {event.get('version')!r} of {event['type']}"
            f" (expected {envelope.VERSION})"
        )
    if not isinstance(event.get("data"), dict):
        raise MalformedMessage("message has no data object")
    return event


def event_id_of(raw: bytes) -> str:
    """The envelope id of a raw message, or '' when it has none (used as attempts key)."""
    try:
        event = json.loads(raw)
    except (ValueError, RecursionError):
        return ""
    value = event.get("id") if isinstance(event, dict) else None
    return value if isinstance(value, str) else ""


def _text_and_b64(raw: bytes) -> tuple[str, str]:
    """The message as text for the dead letter, and base64 only when it is not UTF-8."""
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class DeadLetter:
    """One entry of a dead-letter list."""

    entry: bytes
    """The stored JSON, byte for byte (what requeue/purge match on)."""
    message: str
    error: str
    attempts: int
    failed_at: str
    queue: str
    raw: bytes
    """The original message bytes (from ``message_b64`` when it was not UTF-8)."""

    @classmethod
    def load(cls, entry: bytes) -> DeadLetter:
        """Parse a stored entry."""
        data = json.loads(entry)
        raw = (
            base64.b64decode(data["message_b64"])
            if data.get("message_b64")
            else str(data["message"]).encode("utf-8")
        )
        return cls(
            entry=entry,
            message=str(data["message"]),
            error=str(data["error"]),
            attempts=int(data["attempts"]),
            failed_at=str(data["failed_at"]),
            queue=str(data["queue"]),
            raw=raw,
        )


class Consumer(Protocol):
    """What a worker needs from a queue (Dramatiq style): take, then settle each message."""

    def take(self, worker: str, count: int, timeout: float) -> list[bytes]:
        """Move up to ``count`` messages into the worker's processing list."""

    def ack(self, worker: str, messages: Sequence[bytes]) -> int:
        """Done: remove from processing (and forget attempts)."""

    def fail(self, worker: str, message: bytes, error: str, *, permanent: bool) -> str:
        """Failed: schedule a retry or dead-letter it; returns 'retried', 'dead' or 'lost'."""

    def release(self, worker: str, messages: Sequence[bytes]) -> int:
        """Not started: put back at the head of pending."""


# Shared by every script that puts a message back in line (reap, release, promote,
# requeue, push): which lane a message belongs to, and where it goes. ``'"express"'`` is
# a cheap filter; only a message that contains it is decoded. Garbage is standard.
_LANES = """
local function is_express(m)
  if not string.find(m, '"express"', 1, true) then return false end
  local ok, e = pcall(cjson.decode, m)
  return ok and type(e) == 'table' and e['priority'] == 'express'
end
-- An express message goes to the express list only when standard work waits: with no
-- backlog there is nothing to jump, and on pending a worker blocked in BLMOVE gets it.
local function lane(pending, express, m)
  if is_express(m) and redis.call('LLEN', pending) > 0 then return express end
  return pending
end
-- Put messages back at the heads of their lanes, in order: standard ones first, so
-- the lane rule sees them.
local function to_heads(pending, express, ms)
  local fast = {}
  for i = #ms, 1, -1 do
    if is_express(ms[i]) then fast[#fast + 1] = ms[i]
    else redis.call('LPUSH', pending, ms[i]) end
  end
  local target = pending
  if redis.call('LLEN', pending) > 0 then target = express end
  for _, m in ipairs(fast) do redis.call('LPUSH', target, m) end
end
"""

# KEYS: pending, processing, deaths, express, streak. ARGV: count, sha1 of a message the
# caller already holds in this batch ('' if none), ratio. Returns {deaths of a suspect
# taken alone or 0, m...}. Express first, but after ``ratio`` express messages in a row
# one standard message while standard work waits (the anti-starvation rule; the streak
# survives between calls in KEYS[5]). Fast path: no express work and no suspects, plain
# LMOVEs. A suspect (a message some worker died holding) is only ever taken alone.
_TAKE = """
local out = {0}
local suspects = redis.call('HLEN', KEYS[3]) > 0
if suspects and ARGV[2] ~= '' then
  local d = redis.call('HGET', KEYS[3], ARGV[2])
  if d then out[1] = tonumber(d) return out end
end
local express = redis.call('LLEN', KEYS[4])
local had_express = express > 0
local ratio = tonumber(ARGV[3])
local streak = 0
if had_express then streak = tonumber(redis.call('GET', KEYS[5]) or '0') end
for i = 1, tonumber(ARGV[1]) do
  local src = KEYS[1]
  if express > 0 and (streak < ratio or redis.call('LLEN', KEYS[1]) == 0) then
    src = KEYS[4]
  end
  local alone = false
  if suspects then
    local head = redis.call('LINDEX', src, 0)
    if not head then break end
    local d = redis.call('HGET', KEYS[3], redis.sha1hex(head))
    if d then
      if #out > 1 or ARGV[2] ~= '' then break end
      out[1] = tonumber(d)
      alone = true
    end
  end
  local m = redis.call('LMOVE', src, KEYS[2], 'LEFT', 'RIGHT')
  if not m then break end
  out[#out + 1] = m
  if src == KEYS[4] then
    express = express - 1
    streak = streak + 1
  else
    streak = 0
  end
  if alone then break end
end
if had_express then
  if express == 0 then redis.call('DEL', KEYS[5]) else redis.call('SET', KEYS[5], streak) end
end
return out
"""

_ACK = """
local n = tonumber(ARGV[1])
local done = 0
local suspects = redis.call('HLEN', KEYS[4]) > 0
for i = 2, n + 1 do
  local removed = redis.call('LREM', KEYS[1], 1, ARGV[i])
  done = done + removed
  if suspects and removed > 0 then redis.call('HDEL', KEYS[4], redis.sha1hex(ARGV[i])) end
end
if #ARGV > n + 1 then
  redis.call('HDEL', KEYS[2], unpack(ARGV, n + 2))
end
if done > 0 then redis.call('HINCRBY', KEYS[3], 'processed', done) end
return done
"""

# KEYS: processing, attempts, delayed, dead, stats, deaths
# ARGV: raw, id, now, error, failed_at, queue, text, b64, permanent, delay_1 .. delay_max
# delay_k is the wait after the k-th failure; there are max_attempts of them.
_FAIL = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return {0, 0} end
local n
if ARGV[2] ~= '' then
  n = redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
else
  n = 1
end
redis.call('HINCRBY', KEYS[5], 'failed', 1)
local max = #ARGV - 9
if ARGV[9] == '1' or n >= max then
  local entry = {message = ARGV[7], error = ARGV[4], attempts = n,
                 failed_at = ARGV[5], queue = ARGV[6]}
  if ARGV[8] ~= '' then entry['message_b64'] = ARGV[8] end
  redis.call('RPUSH', KEYS[4], cjson.encode(entry))
  if ARGV[2] ~= '' then redis.call('HDEL', KEYS[2], ARGV[2]) end
  redis.call('HDEL', KEYS[6], redis.sha1hex(ARGV[1]))
  redis.call('HINCRBY', KEYS[5], 'dead', 1)
  return {2, n}
end
local now = tonumber(ARGV[3])
if not now then local t = redis.call('TIME') now = t[1] + t[2] / 1e6 end
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[9 + n]), ARGV[1])
redis.call('HINCRBY', KEYS[5], 'retried', 1)
return {1, n}
"""

# KEYS: delayed, pending, express. ARGV: now ('' = Redis's own clock, TIME), limit.
_PROMOTE = (
    _LANES
    + """
local now = tonumber(ARGV[1])
if not now then local t = redis.call('TIME') now = t[1] + t[2] / 1e6 end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, ARGV[2])
for _, m in ipairs(due) do
  redis.call('ZREM', KEYS[1], m)
  redis.call('RPUSH', lane(KEYS[2], KEYS[3], m), m)
end
return #due
"""
)

# Moves the dead worker's list back to the heads of the lanes (in order), and counts a
# death for each message (KEYS[5]): the worker died holding it. KEYS[6]: express.
_REAP = (
    _LANES
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local held = redis.call('LRANGE', KEYS[2], 0, -1)
redis.call('DEL', KEYS[2])
for _, m in ipairs(held) do redis.call('HINCRBY', KEYS[5], redis.sha1hex(m), 1) end
to_heads(KEYS[3], KEYS[6], held)
redis.call('SREM', KEYS[4], ARGV[1])
return #held
"""
)

# KEYS: processing, pending, express. ARGV: the messages, in order.
_RELEASE = (
    _LANES
    + """
local back = {}
for i = 1, #ARGV do
  if redis.call('LREM', KEYS[1], 1, ARGV[i]) == 1 then back[#back + 1] = ARGV[i] end
end
to_heads(KEYS[2], KEYS[3], back)
return #back
"""
)

# KEYS: pending, express. ARGV: messages, each to the tail of its lane.
_PUSH = (
    _LANES
    + """
for i = 1, #ARGV do redis.call('RPUSH', lane(KEYS[1], KEYS[2], ARGV[i]), ARGV[i]) end
return redis.call('LLEN', KEYS[1]) + redis.call('LLEN', KEYS[2])
"""
)

_DEREGISTER = """
redis.call('DEL', KEYS[1])
if redis.call('LLEN', KEYS[2]) == 0 then
  redis.call('SREM', KEYS[3], ARGV[1])
  return 1
end
return 0
"""

# One script, not a MULTI pipeline: same slot, and redis-py's cluster transactions
# mishandle a failover (a ClusterDownError poisons the client's slot cache).
_HEARTBEAT = """
redis.call('SET', KEYS[1], '1', 'EX', ARGV[2])
return redis.call('SADD', KEYS[2], ARGV[1])
"""

_PURGE = """
local n = redis.call('LLEN', KEYS[1])
redis.call('DEL', KEYS[1])
return n
"""

# KEYS: dead, pending, attempts, deaths, express.
_REQUEUE = (
    _LANES
    + """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('RPUSH', lane(KEYS[2], KEYS[5], ARGV[2]), ARGV[2])
if ARGV[3] ~= '' then redis.call('HDEL', KEYS[3], ARGV[3]) end
redis.call('HDEL', KEYS[4], redis.sha1hex(ARGV[2]))
return 1
"""
)


class RedisQueue:
    """One named queue on Redis. Thread-safe (redis-py pools connections).

    Args:
        client: a Redis client; it must NOT decode responses (messages are bytes).
        name: the queue name (``payment``, ``order-updates``, ...).
        max_attempts: failed attempts before a message is dead-lettered.
        max_crashes: workers a message may kill before it is dead-lettered.
        backoff_base: seconds, see :func:`backoff`.
        backoff_max: seconds, see :func:`backoff`.
        express_ratio: express messages taken in a row while standard work waits
            before one standard message is (the anti-starvation rule).
    """

    def __init__(
        self,
        client: redis.Redis,
        name: str,
        *,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        max_crashes: int = DEFAULT_MAX_CRASHES,
        backoff_base: float = DEFAULT_BACKOFF_BASE,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        express_ratio: int = DEFAULT_EXPRESS_RATIO,
    ) -> None:
        if express_ratio < 1:
            raise ValueError(f"express_ratio must be >= 1, got {express_ratio}")
        self.client = client
        self.name = name
        self.max_attempts = max_attempts
        self.max_crashes = max_crashes
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.express_ratio = express_ratio
        self.pending_key = keys.pending(name)
        self.express_key = keys.express(name)
        self.streak_key = keys.express_streak(name)
        self.delayed_key = keys.delayed(name)
        self.dead_key = keys.dead(name)
        self.workers_key = keys.workers(name)
        self.attempts_key = keys.attempts(name)
        self.stats_key = keys.stats(name)
        self.deaths_key = keys.deaths(name)
        self._take = client.register_script(_TAKE)
        self._ack = client.register_script(_ACK)
        self._fail = client.register_script(_FAIL)
        self._promote = client.register_script(_PROMOTE)
        self._reap = client.register_script(_REAP)
        self._release = client.register_script(_RELEASE)
        self._deregister = client.register_script(_DEREGISTER)
        self._requeue = client.register_script(_REQUEUE)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._purge = client.register_script(_PURGE)
        self._push = client.register_script(_PUSH)

    # --- producing -------------------------------------------------------------

    def push(self, *messages: bytes | str) -> int:
        """Append messages to their lanes (express or standard); returns the waiting count.

        Producers of events use :class:`messaging.publisher.EventPublisher`, which applies
        the same rule; this is for tools and tests.
        """
        if not messages:
            return 0
        return int(self._push(keys=[self.pending_key, self.express_key], args=list(messages)))

    # --- consuming -------------------------------------------------------------

    def take(self, worker: str, count: int, timeout: float) -> list[bytes]:
        """Move up to ``count`` messages from pending into ``worker``'s processing list.

        One Lua call moves what is there; when nothing is, BLMOVE waits up to
        ``timeout`` seconds and a second call tops the batch up. ``timeout=0`` never
        blocks. A suspect (a message some worker died holding) comes alone; one that
        has killed ``max_crashes`` workers is dead-lettered here instead of returned.
        """
        processing = keys.processing(self.name, worker)
        tag = [self.pending_key, processing, self.deaths_key, self.express_key, self.streak_key]
        deaths, *got = self._take(keys=tag, args=[count, "", self.express_ratio])
        if not got and timeout > 0:
            first: bytes | None = self.client.blmove(  # type: ignore[assignment]
                self.pending_key, processing, timeout, "LEFT", "RIGHT"
            )
            if first is None:
                return []
            sha = hashlib.sha1(first).hexdigest()  # a hash key, not security
            deaths, *more = self._take(keys=tag, args=[count - 1, sha, self.express_ratio])
            got = [first, *more]
        if deaths and int(deaths) >= self.max_crashes:
            [poison] = got
            reason = f"worker died {int(deaths)} times handling it"
            self.fail(worker, poison, reason, permanent=True)
            log.error("%s: dead-lettered a message: %s", self.name, reason)
            return []
        return got

    def ack(self, worker: str, messages: Sequence[bytes]) -> int:
        """Remove handled messages from processing in one call; returns how many were there.

        Also forgets their attempt counts and counts them as processed. A message the
        reaper already moved back is not counted (it will be delivered again).
        """
        if not messages:
            return 0
        ids = [i for i in (event_id_of(m) for m in messages) if i]
        return int(
            self._ack(
                keys=[
                    keys.processing(self.name, worker),
                    self.attempts_key,
                    self.stats_key,
                    self.deaths_key,
                ],
                args=[len(messages), *messages, *ids],
            )
        )

    def fail(
        self,
        worker: str,
        message: bytes,
        error: str,
        *,
        permanent: bool = False,
        now: float | None = None,
    ) -> str:
        """Settle a failed message: retry later, or dead-letter it.

        In one Lua call: remove it from processing, count the attempt, and either ZADD
        it to the delayed set (due after :func:`backoff`) or, when permanent or out of
        attempts, append a dead letter. Returns ``'retried'``, ``'dead'``, or ``'lost'``
        when it was no longer ours (the reaper returned it to pending meanwhile).
        """
        text, b64 = _text_and_b64(message)
        delays = [
            backoff(n, self.backoff_base, self.backoff_max) for n in range(1, self.max_attempts + 1)
        ]
        outcome, _attempts = self._fail(
            keys=[
                keys.processing(self.name, worker),
                self.attempts_key,
                self.delayed_key,
                self.dead_key,
                self.stats_key,
                self.deaths_key,
            ],
            args=[
                message,
                event_id_of(message),
                "" if now is None else repr(now),  # '': Redis's clock (TIME)
                error.replace("\n", " ")[:2000],
                utc_now_iso(),
                self.name,
                text,
                b64,
                "1" if permanent else "0",
                *(repr(d) for d in delays),
            ],
        )
        return {0: "lost", 1: "retried", 2: "dead"}[int(outcome)]

    def in_flight(self, worker: str) -> list[bytes]:
        """The messages in ``worker``'s processing list, oldest first."""
        return list(self.client.lrange(keys.processing(self.name, worker), 0, -1))  # type: ignore[arg-type]

    def release(self, worker: str, messages: Sequence[bytes]) -> int:
        """Put taken-but-not-started messages back at the head of pending, in order."""
        if not messages:
            return 0
        return int(
            self._release(
                keys=[keys.processing(self.name, worker), self.pending_key, self.express_key],
                args=list(messages),
            )
        )

    # --- liveness --------------------------------------------------------------

    def heartbeat(self, worker: str, ttl: int) -> bool:
        """Refresh the worker's heartbeat and registration.

        Returns False when the worker had been reaped meanwhile (its heartbeat expired
        while it was alive, e.g. frozen or cut off from Redis): its messages may be
        handled twice, which idempotent handlers tolerate.
        """
        added = self._heartbeat(
            keys=[keys.heartbeat(self.name, worker), self.workers_key], args=[worker, ttl]
        )
        return not added

    def drop_heartbeat(self, worker: str) -> None:
        """Delete the worker's heartbeat: the next reap returns its messages (it gave up)."""
        self.client.delete(keys.heartbeat(self.name, worker))

    def deregister(self, worker: str) -> bool:
        """Drop the heartbeat; forget the worker if its processing list is empty.

        A worker that stops with messages still in processing stays registered, so
        the reaper returns them. Returns True when the worker was forgotten.
        """
        return bool(
            self._deregister(
                keys=[
                    keys.heartbeat(self.name, worker),
                    keys.processing(self.name, worker),
                    self.workers_key,
                ],
                args=[worker],
            )
        )

    def reap(self) -> dict[str, int]:
        """Return the in-flight messages of dead workers to pending.

        Run periodically by every worker. A worker is dead when it is registered but
        its heartbeat key has expired. Returns ``{worker: messages moved back}``.
        """
        reaped: dict[str, int] = {}
        for raw in self.client.smembers(self.workers_key):
            worker = raw.decode() if isinstance(raw, bytes) else str(raw)
            moved = int(
                self._reap(
                    keys=[
                        keys.heartbeat(self.name, worker),
                        keys.processing(self.name, worker),
                        self.pending_key,
                        self.workers_key,
                        self.deaths_key,
                        self.express_key,
                    ],
                    args=[worker],
                )
            )
            if moved >= 0:
                reaped[worker] = moved
                log.info(
                    "%s: reaped worker %s, %d message(s) back to pending", self.name, worker, moved
                )
        return reaped

    def promote(self, now: float | None = None, limit: int = PROMOTE_LIMIT) -> int:
        """Move delayed messages that are due back to pending; returns how many."""
        return int(
            self._promote(
                keys=[self.delayed_key, self.pending_key, self.express_key],
                args=["" if now is None else repr(now), limit],
            )
        )

    # --- dead letters ----------------------------------------------------------

    def dead_letters(self, start: int = 0, stop: int = -1) -> list[DeadLetter]:
        """The dead letters (oldest first), parsed."""
        entries: list[bytes] = list(self.client.lrange(self.dead_key, start, stop))  # type: ignore[arg-type]
        return [DeadLetter.load(e) for e in entries]

    def requeue_dead(self, letters: Iterable[DeadLetter] | None = None) -> int:
        """Move dead letters (all by default) back to pending with their attempts reset."""
        chosen = self.dead_letters() if letters is None else list(letters)
        moved = 0
        for letter in chosen:
            moved += int(
                self._requeue(
                    keys=[
                        self.dead_key,
                        self.pending_key,
                        self.attempts_key,
                        self.deaths_key,
                        self.express_key,
                    ],
                    args=[letter.entry, letter.raw, event_id_of(letter.raw)],
                )
            )
        return moved

    def purge_dead(self) -> int:
        """Delete every dead letter; returns how many there were."""
        return int(self._purge(keys=[self.dead_key]))

    # --- observing -------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counters plus the current sizes of pending, delayed, dead and in-flight."""
        counters = {
            k.decode() if isinstance(k, bytes) else str(k): int(v)
            for k, v in self.client.hgetall(self.stats_key).items()
        }
        workers = [
            w.decode() if isinstance(w, bytes) else str(w)
            for w in self.client.smembers(self.workers_key)
        ]
        pipe = self.client.pipeline(transaction=False)
        pipe.llen(self.pending_key)
        pipe.llen(self.express_key)
        pipe.zcard(self.delayed_key)
        pipe.llen(self.dead_key)
        for w in workers:
            pipe.llen(keys.processing(self.name, w))
        pending, express, delayed, dead, *inflight = pipe.execute()
        return {
            "processed": counters.get("processed", 0),
            "failed": counters.get("failed", 0),
            "retried": counters.get("retried", 0),
            "dead": counters.get("dead", 0),
            "pending": int(pending) + int(express),
            "express": int(express),
            "delayed": int(delayed),
            "dead_letters": int(dead),
            "in_flight": sum(int(n) for n in inflight),
            "workers": len(workers),
        }
