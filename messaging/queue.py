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
- ``attempts(q)`` hash event id -> ``"<failed attempts> <first failure> <revivals>"``
  (the first failure on Redis's clock); ``dead(q)`` list of JSON dead letters;
  ``stats(q)`` hash of counters (processed, failed, retried, dead, revived).
- ``revivable(q)`` sorted set of the dead letters of a transient cause, scored by when
  they are next tried (see *Retry budgets* below).
- ``deaths(q)`` hash SHA-1 of the message -> workers that died holding it. The reaper
  counts one for every message it takes back from a dead worker (as Sidekiq Pro's
  super_fetch counts recoveries). A message with a count is a *suspect*: the take
  script hands it out alone, never in a batch, so a message that kills its worker does
  not take innocent batch-mates down with it again (they were returned with it by the
  reaper, and are taken again on their own), and its count is its own. A suspect that
  has killed CONSUMER_MAX_CRASHES workers is dead-lettered when it is next taken, with
  the reason "worker died N times handling it". An ack or a dead letter forgets it.

Retry budgets (as the ``backoff`` library's ``max_time``, not only Celery's and
Dramatiq's ``max_retries``): :func:`classify` sorts a failure into three kinds. A
*permanent* one (bad data, SMTP 5xx) is dead-lettered at once; an unexpected one (a
bug, most likely) after CONSUMER_MAX_ATTEMPTS; a *transient* one (connection refused,
a timeout, SMTP 4xx, a database that does not answer) is retried with capped
exponential backoff and full jitter until CONSUMER_RETRY_SECONDS have passed since the
message's first failure, however many attempts that takes: a 15 s SMTP outage no
longer spends five attempts and dead-letters the mail for good. The first failure's
time lives in the attempts hash, keyed by event id, so it survives the reaper and the
delayed set (the budget cannot restart by accident); the last retry is scheduled at the
budget's end at the latest. A transient dead letter is not the end either (Sidekiq's
dead set waits for an operator; a passing outage should not need one): it is also
scored in ``revivable(q)``, and every worker's housekeeping calls :meth:`revive`, which
puts due ones back on pending at a bounded rate per queue (CONSUMER_REVIVE_RATE a
second, whichever worker gets there first). A revived message keeps its first failure,
so it is a probe: one attempt, and if the dependency is still down it is dead-lettered
again at once and waits twice as long (CONSUMER_REVIVE_SECONDS, doubling, at most the
budget) before the next probe; and whenever nothing was revived for
CONSUMER_REVIVE_SECONDS the earliest letter goes ahead of its schedule, so a
dependency that is back is noticed within that time. Once a probe succeeds, its ack
sets ``revive-recovered(q)``, and from then on every transient dead letter is due:
the rest follow at the rate bound, not after their own schedules. A transient
dead-lettering clears that flag again (the dependency went away again).

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
import smtplib
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
DEFAULT_RETRY_SECONDS = 3600.0
"""Seconds a transient failure is retried, from the first failure (CONSUMER_RETRY_SECONDS)."""
DEFAULT_REVIVE_SECONDS = 60.0
"""First wait before a transient dead letter is tried again; doubles per failed revival."""
DEFAULT_REVIVE_RATE = 10
"""Transient dead letters revived per second and queue, at most (CONSUMER_REVIVE_RATE)."""
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


Verdict = Literal["dead", "transient", "retry"]
"""What a failure means: dead-letter now, retry within the time budget, or retry
within the attempt limit."""

_NOT_TRANSIENT_OS_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)
"""OSErrors that a wait does not fix (a path, a permission): counted attempts."""

_TRANSIENT_NAMES = frozenset(
    {
        "sqlalchemy.exc.OperationalError",  # connection refused, "database is locked"
        "sqlalchemy.exc.DisconnectionError",
        "sqlalchemy.exc.TimeoutError",  # the pool had no connection to give
    }
)
"""Transient errors known by name: the core must not import SQLAlchemy for them."""


def classify(exc: BaseException) -> Verdict:
    """Decide what a handler failure means for the message.

    ``dead``: a :class:`PermanentError` (malformed messages included) or an SMTP 5xx
    answer: a retry cannot fix it. ``transient``: a :class:`RetryableError`, a
    connection or timeout error, an SMTP 4xx answer or a lost SMTP connection, a
    database that does not answer: retried until the time budget is spent.
    ``retry``: anything else, retried until the attempts run out, as Dramatiq does: an
    unexpected exception may be a passing condition, and a bug still ends in the dead
    letters after the last attempt.
    """
    if isinstance(exc, PermanentError):
        return "dead"
    if isinstance(exc, RetryableError):
        return "transient"
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _ in exc.recipients.values()]
        return "dead" if codes and all(code >= 500 for code in codes) else "transient"
    if isinstance(exc, smtplib.SMTPResponseException):
        return "dead" if exc.smtp_code >= 500 else "transient"
    if isinstance(exc, OSError):  # ConnectionError, TimeoutError, socket.gaierror, ...
        return "retry" if isinstance(exc, _NOT_TRANSIENT_OS_ERRORS) else "transient"
    names = {f"{c.__module__}.{c.__qualname__}" for c in type(exc).__mro__}
    return "transient" if names & _TRANSIENT_NAMES else "retry"


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
    if len(event["id"]) > envelope.MAX_EVENT_ID_LENGTH:
        # Stored as a key by every consumer (64 characters; a UUID is 36): longer is
        # garbage, not a database error to retry (PostgreSQL refuses it, SQLite not).
        raise MalformedMessage(f"message id longer than {envelope.MAX_EVENT_ID_LENGTH} characters")
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
    cause: str = ""
    """``permanent``, ``attempts`` (out of attempts) or ``transient`` (out of time:
    revived automatically); empty in letters stored before causes were recorded."""
    first_failed: float | None = None
    """Redis time of the message's first failure (transient letters)."""
    revivals: int = 0
    """Times a transient letter was revived and failed again."""

    @property
    def transient(self) -> bool:
        """True when the dependency was away: :meth:`RedisQueue.revive` retries it."""
        return self.cause == "transient"

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
            cause=str(data.get("cause", "")),
            first_failed=float(data["first_failed"]) if "first_failed" in data else None,
            revivals=int(data.get("revivals", 0)),
        )


class Consumer(Protocol):
    """What a worker needs from a queue (Dramatiq style): take, then settle each message."""

    def take(
        self, worker: str, count: int, timeout: float, *, ack: Sequence[bytes] = ()
    ) -> list[bytes]:
        """Ack ``ack`` (handled), then move up to ``count`` messages into the worker's
        processing list."""

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
_TAKE_FUNCTION = """
local function take(K, A)
  local out = {0}
  local suspects = redis.call('HLEN', K[3]) > 0
  if suspects and A[2] ~= '' then
    local d = redis.call('HGET', K[3], A[2])
    if d then out[1] = tonumber(d) return out end
  end
  if tonumber(A[1]) < 1 then return out end  -- LRANGE 0 -1 below would be everything
  local express = redis.call('LLEN', K[4])
  if express == 0 and not suspects then
    -- Only standard work, nobody's suspect: one range, one trim, one push.
    local ms = redis.call('LRANGE', K[1], 0, tonumber(A[1]) - 1)
    if #ms > 0 then
      redis.call('LTRIM', K[1], #ms, -1)
      redis.call('RPUSH', K[2], unpack(ms))
    end
    for _, m in ipairs(ms) do out[#out + 1] = m end
    return out
  end
  local had_express = express > 0
  local ratio = tonumber(A[3])
  local streak = 0
  if had_express then streak = tonumber(redis.call('GET', K[5]) or '0') end
  for i = 1, tonumber(A[1]) do
    local src = K[1]
    if express > 0 and (streak < ratio or redis.call('LLEN', K[1]) == 0) then
      src = K[4]
    end
    local alone = false
    if suspects then
      local head = redis.call('LINDEX', src, 0)
      if not head then break end
      local d = redis.call('HGET', K[3], redis.sha1hex(head))
      if d then
        if #out > 1 or A[2] ~= '' then break end
        out[1] = tonumber(d)
        alone = true
      end
    end
    local m = redis.call('LMOVE', src, K[2], 'LEFT', 'RIGHT')
    if not m then break end
    out[#out + 1] = m
    if src == K[4] then
      express = express - 1
      streak = streak + 1
    else
      streak = 0
    end
    if alone then break end
  end
  if had_express then
    if express == 0 then redis.call('DEL', K[5]) else redis.call('SET', K[5], streak) end
  end
  return out
end
"""
_TAKE = _TAKE_FUNCTION + "return take(KEYS, ARGV)\n"

# KEYS: processing, attempts, stats, deaths, recovered. ARGV: n, the n messages, then the
# event ids whose attempt counts to forget. Returns how many were still there.
_ACK_FUNCTION = """
local function ack(K, A)
  local n = tonumber(A[1])
  local done = 0
  local suspects = redis.call('HLEN', K[4]) > 0
  for i = 2, n + 1 do
    local removed = redis.call('LREM', K[1], 1, A[i])
    done = done + removed
    if suspects and removed > 0 then redis.call('HDEL', K[4], redis.sha1hex(A[i])) end
  end
  if #A > n + 1 then
    if redis.call('HLEN', K[2]) > 0 then
      for i = n + 2, #A do  -- a revived message went through: its dependency is back
        local v = redis.call('HGET', K[2], A[i])
        if v and not string.match(v, ' 0$') and string.match(v, ' %d+$') then
          redis.call('SET', K[5], '1')
        end
      end
    end
    redis.call('HDEL', K[2], unpack(A, n + 2))
  end
  if done > 0 then redis.call('HINCRBY', K[3], 'processed', done) end
  return done
end
"""
_ACK = _ACK_FUNCTION + "return ack(KEYS, ARGV)\n"

# The ack of a handled batch and the next take in ONE round trip (same hash tag): a
# worker that takes one message at a time as they arrive saves a round trip each.
# KEYS: processing, attempts, stats, deaths, recovered, pending, express, streak.
# ARGV: count, ratio, n, the n messages, k, the k event ids. Returns {acked, deaths, m...}.
_ACK_TAKE = (
    _ACK_FUNCTION
    + _TAKE_FUNCTION
    + """
local n = tonumber(ARGV[3])
local k = tonumber(ARGV[4 + n])
local acked = {n}
for i = 4, 3 + n do acked[#acked + 1] = ARGV[i] end
for i = 5 + n, 4 + n + k do acked[#acked + 1] = ARGV[i] end
local done = ack({KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]}, acked)
local out = take({KEYS[6], KEYS[1], KEYS[4], KEYS[7], KEYS[8]}, {ARGV[1], '', ARGV[2]})
table.insert(out, 1, done)
return out
"""
)

# KEYS: processing, attempts, delayed, dead, stats, deaths, revivable, recovered
# ARGV: raw, id, now, error, failed_at, queue, text, b64, mode, max_attempts,
#       budget, backoff base, backoff cap, jitter (0..1), revive seconds
# mode: '1' permanent (dead now), '2' transient (retried until the budget is spent),
# '0' anything else (retried until max_attempts). The attempts hash holds, per event
# id, "<failures> <first failure> <revivals>"; the first failure is kept as it is.
_FAIL = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return {0, 0} end
local now = tonumber(ARGV[3])
if not now then local t = redis.call('TIME') now = t[1] + t[2] / 1e6 end
local n, first, revivals = 1, now, 0
if ARGV[2] ~= '' then
  local v = redis.call('HGET', KEYS[2], ARGV[2])
  if v then
    local c, f, r = string.match(v, '^(%d+) ?([%d.]*) ?(%d*)$')
    n = (tonumber(c) or 0) + 1
    first = tonumber(f) or now
    revivals = tonumber(r) or 0
  end
end
redis.call('HINCRBY', KEYS[5], 'failed', 1)
local mode, budget = ARGV[9], tonumber(ARGV[11])
local cause
if mode == '1' then cause = 'permanent'
elseif mode == '2' then if now - first >= budget then cause = 'transient' end
elseif n >= tonumber(ARGV[10]) then cause = 'attempts' end
if cause then
  local entry = {message = ARGV[7], error = ARGV[4], attempts = n,
                 failed_at = ARGV[5], queue = ARGV[6], cause = cause}
  if ARGV[8] ~= '' then entry['message_b64'] = ARGV[8] end
  if cause == 'transient' then
    entry['error'] = 'retry budget of ' .. ARGV[11] .. ' s spent: ' .. ARGV[4]
    entry['first_failed'] = first
    entry['revivals'] = revivals
    entry['event_id'] = ARGV[2]
  end
  local encoded = cjson.encode(entry)
  redis.call('RPUSH', KEYS[4], encoded)
  if cause == 'transient' and ARGV[8] == '' then
    local first_wait = tonumber(ARGV[15])
    local wait = math.min(math.max(budget, first_wait), first_wait * 2 ^ math.min(revivals, 40))
    redis.call('ZADD', KEYS[7], now + wait, encoded)
    redis.call('DEL', KEYS[8])  -- the dependency is (still, again) away
  end
  if ARGV[2] ~= '' then redis.call('HDEL', KEYS[2], ARGV[2]) end
  redis.call('HDEL', KEYS[6], redis.sha1hex(ARGV[1]))
  redis.call('HINCRBY', KEYS[5], 'dead', 1)
  return {2, n}
end
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[2], ARGV[2], string.format('%d %.6f %d', n, first, revivals))
end
local delay = math.min(tonumber(ARGV[13]), tonumber(ARGV[12]) * 2 ^ math.min(n - 1, 62))
delay = delay * tonumber(ARGV[14])
if mode == '2' then delay = math.min(delay, first + budget - now) end
redis.call('ZADD', KEYS[3], now + delay, ARGV[1])
redis.call('HINCRBY', KEYS[5], 'retried', 1)
return {1, n}
"""

# KEYS: revivable, dead, pending, attempts, stats, tick, recovered, express, probe. ARGV:
# now ('' = TIME), limit, tick ms (0: no rate bound), probe ms (0: none). When nothing
# was revived for a probe interval, the earliest letter is revived ahead of its
# schedule. A letter no longer in the dead list (an operator requeued or discarded it)
# is only forgotten. The attempts entry comes back with one more revival and the same
# first failure: a revived message's budget is already spent. Once a revived message
# was acked (the recovered flag), every letter is due: the rest follow at the rate
# bound instead of waiting out their schedules.
_REVIVE = (
    _LANES
    + """
if ARGV[3] ~= '0' and not redis.call('SET', KEYS[6], '1', 'NX', 'PX', ARGV[3]) then
  return -1
end
local now = tonumber(ARGV[1])
if not now then local t = redis.call('TIME') now = t[1] + t[2] / 1e6 end
local upto = now
if redis.call('EXISTS', KEYS[7]) == 1 then
  if redis.call('ZCARD', KEYS[1]) == 0 then redis.call('DEL', KEYS[7]) return 0 end
  upto = '+inf'
end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', upto, 'LIMIT', 0, ARGV[2])
if ARGV[4] ~= '0' then
  if #due > 0 then
    redis.call('SET', KEYS[9], '1', 'PX', ARGV[4])
  elseif redis.call('SET', KEYS[9], '1', 'NX', 'PX', ARGV[4]) then
    due = redis.call('ZRANGE', KEYS[1], 0, 0)  -- the canary: the earliest, ahead of time
  end
end
local n = 0
for _, e in ipairs(due) do
  redis.call('ZREM', KEYS[1], e)
  if redis.call('LREM', KEYS[2], 1, e) == 1 then
    local d = cjson.decode(e)
    local id = d['event_id'] or ''
    if id ~= '' then
      redis.call('HSET', KEYS[4], id, string.format('%d %.6f %d',
        d['attempts'], d['first_failed'] or now, (d['revivals'] or 0) + 1))
    end
    redis.call('RPUSH', lane(KEYS[3], KEYS[8], d['message']), d['message'])
    n = n + 1
  end
end
if n > 0 then redis.call('HINCRBY', KEYS[5], 'revived', n) end
return n
"""
)

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
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return n
"""

# KEYS: dead, pending, attempts, deaths, revivable, express.
_REQUEUE = (
    _LANES
    + """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('RPUSH', lane(KEYS[2], KEYS[6], ARGV[2]), ARGV[2])
if ARGV[3] ~= '' then redis.call('HDEL', KEYS[3], ARGV[3]) end
redis.call('HDEL', KEYS[4], redis.sha1hex(ARGV[2]))
redis.call('ZREM', KEYS[5], ARGV[1])
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
        retry_seconds: the time budget of a transient failure, from the first one.
        revive_seconds: first wait before a transient dead letter is revived.
        revive_rate: transient dead letters revived per second, at most.
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
        retry_seconds: float = DEFAULT_RETRY_SECONDS,
        revive_seconds: float = DEFAULT_REVIVE_SECONDS,
        revive_rate: int = DEFAULT_REVIVE_RATE,
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
        self.retry_seconds = retry_seconds
        self.revive_seconds = revive_seconds
        self.revive_rate = revive_rate
        self.revivable_key = keys.revivable(name)
        self.recovered_key = keys.revive_recovered(name)
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
        self._ack_take = client.register_script(_ACK_TAKE)
        self._fail = client.register_script(_FAIL)
        self._promote = client.register_script(_PROMOTE)
        self._reap = client.register_script(_REAP)
        self._release = client.register_script(_RELEASE)
        self._deregister = client.register_script(_DEREGISTER)
        self._requeue = client.register_script(_REQUEUE)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._purge = client.register_script(_PURGE)
        self._push = client.register_script(_PUSH)
        self._revive = client.register_script(_REVIVE)

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

    def take(
        self, worker: str, count: int, timeout: float, *, ack: Sequence[bytes] = ()
    ) -> list[bytes]:
        """Move up to ``count`` messages from pending into ``worker``'s processing list.

        One Lua call moves what is there; when nothing is, BLMOVE waits up to
        ``timeout`` seconds and a second call tops the batch up. ``timeout=0`` never
        blocks. A suspect (a message some worker died holding) comes alone; one that
        has killed ``max_crashes`` workers is dead-lettered here instead of returned.

        ``ack``: handled messages to acknowledge first, in the same Lua call (as
        :meth:`ack` does, before anything is taken): one round trip per message fewer
        for a worker that takes them one at a time. When this raises, the ack may or
        may not have happened; acking again is harmless.
        """
        processing = keys.processing(self.name, worker)
        tag = [self.pending_key, processing, self.deaths_key, self.express_key, self.streak_key]
        if ack:
            ids = [i for i in (event_id_of(m) for m in ack) if i]
            _acked, deaths, *got = self._ack_take(
                keys=[
                    processing,
                    self.attempts_key,
                    self.stats_key,
                    self.deaths_key,
                    self.recovered_key,
                    self.pending_key,
                    self.express_key,
                    self.streak_key,
                ],
                args=[count, self.express_ratio, len(ack), *ack, len(ids), *ids],
            )
        else:
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
                    self.recovered_key,
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
        transient: bool = False,
        now: float | None = None,
    ) -> str:
        """Settle a failed message: retry later, or dead-letter it.

        In one Lua call: remove it from processing, count the attempt, and either ZADD
        it to the delayed set (due after :func:`backoff`, computed in the script from
        the attempt count) or append a dead letter: at once when ``permanent``; for a
        ``transient`` failure once ``retry_seconds`` have passed since the message's
        first failure; for any other once ``max_attempts`` failed. Returns
        ``'retried'``, ``'dead'``, or ``'lost'`` when it was no longer ours (the reaper
        returned it to pending meanwhile). ``now`` replaces Redis's clock (tests).
        """
        text, b64 = _text_and_b64(message)
        outcome, _attempts = self._fail(
            keys=[
                keys.processing(self.name, worker),
                self.attempts_key,
                self.delayed_key,
                self.dead_key,
                self.stats_key,
                self.deaths_key,
                self.revivable_key,
                self.recovered_key,
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
                "1" if permanent else "2" if transient else "0",
                self.max_attempts,
                f"{self.retry_seconds:f}".rstrip("0").rstrip("."),
                repr(self.backoff_base),
                repr(self.backoff_max),
                repr(random.random()),  # the full jitter's draw
                repr(self.revive_seconds),
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

    def revive(self, now: float | None = None, *, bounded: bool = True) -> int:
        """Put due transient dead letters back on pending; returns how many (-1: not
        this worker's turn).

        Run by every worker's housekeeping. ``bounded``: at most ``revive_rate`` per
        second for the whole queue, whichever worker calls first (a key with a
        one-second TTL is the turn), and at least one letter per ``revive_seconds``
        (the earliest, ahead of its schedule when nothing else was due: a canary, so a
        dependency that is back is noticed within ``revive_seconds`` even when every
        letter's own wait has doubled to an hour). ``bounded=False``: the schedules
        alone (tests). Each revived message keeps its first failure, so
        a failure that is still transient dead-letters it again at once, to be
        revived after twice the wait.
        """
        return int(
            self._revive(
                keys=[
                    self.revivable_key,
                    self.dead_key,
                    self.pending_key,
                    self.attempts_key,
                    self.stats_key,
                    keys.revive_tick(self.name),
                    self.recovered_key,
                    self.express_key,
                    keys.revive_probe(self.name),
                ],
                args=[
                    "" if now is None else repr(now),
                    self.revive_rate,
                    1000 if bounded else 0,
                    max(1, int(self.revive_seconds * 1000)) if bounded else 0,
                ],
            )
        )

    def revivable(self) -> int:
        """Transient dead letters waiting to be revived (work not given up on)."""
        return int(self.client.zcard(self.revivable_key))

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
                        self.revivable_key,
                        self.express_key,
                    ],
                    args=[letter.entry, letter.raw, event_id_of(letter.raw)],
                )
            )
        return moved

    def purge_dead(self) -> int:
        """Delete every dead letter; returns how many there were."""
        return int(self._purge(keys=[self.dead_key, self.revivable_key, self.recovered_key]))

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
            "revived": counters.get("revived", 0),
            "pending": int(pending) + int(express),
            "express": int(express),
            "delayed": int(delayed),
            "dead_letters": int(dead),
            "in_flight": sum(int(n) for n in inflight),
            "workers": len(workers),
        }
