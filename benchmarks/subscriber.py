"""5. Go subscriber: messages/s from the pub/sub channel and from the queue, and losses.

The real go-subscriber binary (built here with ``go build``) listens on a benchmark
channel and a benchmark list (PATTERN=both; BLPOP is one message per round trip); its
display lines go to a file in the scratch directory, which is how messages are counted
as they arrive (the final line "Subscriber stopped. Total messages received: N" is
checked against the count after SIGTERM). Beside it, in the same run and the same way,
:mod:`benchmarks.py_subscriber`: the same work in redis-py.

Pub/sub: this process PUBLISHes N Hello-style envelopes pipelined (100 per pipeline) as
fast as Redis takes them; rate = received / (last arrival - first publish); lost =
N - received (pub/sub drops what a slow or disconnected subscriber cannot take).
Queue: N messages become the list in one RENAME; rate = N / time until all arrived.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import redis

from benchmarks.harness import BIN, ROOT, Context, Row
from devtools.procs import Proc, wait_until
from messaging import envelope

SECTION = "5"
CHANNEL = "bench:channel"
QUEUE = "bench:queue"
STAGING = "bench:staging"
TOTAL = re.compile(rb"Total messages received: (\d+)")


def build_go(ctx: Context) -> Path:
    """Build go-subscriber into the scratch directory."""
    out = ctx.scratch("go") / "go-subscriber"
    subprocess.run(
        ["go", "build", "-o", str(out), "."],
        cwd=ROOT / "go-subscriber",
        check=True,
        capture_output=True,
        timeout=600,
    )
    return out


def messages(count: int) -> list[str]:
    """Hello-style envelopes, as the original publisher sends."""
    return [
        envelope.dumps(
            {
                "id": f"00000000-0000-4000-8000-{n:012d}",
                "timestamp": "2026-11-28T10:15:02.123456+00:00",
                "message": f"Hello from Python #{n}",
                "sender": "python-publisher",
                "count": n,
            }
        )
        for n in range(1, count + 1)
    ]


class Counter:
    """Counts display lines appended to a subscriber's output file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.count = 0
        self.rest = b""

    def poll(self) -> int:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        data = self.rest + data
        complete, _, self.rest = data.rpartition(b"\n")
        self.count += complete.count(b" from pub-sub]") + complete.count(b" from queue]")
        return self.count


def _start(ctx: Context, argv: list[str], pattern: str, name: str) -> tuple[Proc, Counter]:
    env = {
        "REDIS_URL": ctx.redis_url,
        "PATTERN": pattern,
        "CHANNEL": CHANNEL,
        "QUEUE": QUEUE,
        "LOG_LEVEL": "WARNING",
    }
    log = ctx.scratch("sub") / f"{name}.out"
    proc = Proc(argv, env, log)
    return proc, Counter(log)


def _stop(proc: Proc, counter: Counter) -> int:
    """SIGTERM; check the subscriber's own total against the count; returns it."""
    code = proc.terminate(15.0)
    counted = counter.poll()
    found = TOTAL.findall(proc.log_path.read_bytes())
    if code != 0 or not found:
        raise RuntimeError(f"{proc.argv[0]} exited {code} without its total line")
    total = int(found[-1])
    if total != counted:
        raise RuntimeError(f"{proc.argv[0]} says {total} received, {counted} lines counted")
    return total


def one_run(
    ctx: Context, argv: list[str], name: str, payloads: list[str]
) -> tuple[float, int, float]:
    """One subscriber process (PATTERN=both): the pub/sub phase, then the queue phase.

    Returns (pub/sub messages/s received, pub/sub messages lost, queue messages/s).
    """
    client = redis.Redis.from_url(ctx.redis_url)
    client.flushdb()
    proc, counter = _start(ctx, argv, "both", name)
    try:

        def subscribed() -> bool:
            proc.check_alive()
            return bool(client.pubsub_numsub(CHANNEL)[0][1])

        wait_until(subscribed, 30, 0.01, f"{name} to subscribe")
        start = time.perf_counter()
        for i in range(0, len(payloads), 100):
            pipe = client.pipeline(transaction=False)
            for payload in payloads[i : i + 100]:
                pipe.publish(CHANNEL, payload)
            pipe.execute()
        last_count, last_change = 0, time.perf_counter()
        deadline = start + 60 + len(payloads) / 1000
        # Done when all arrived, or nothing new arrived for a second (the rest is lost).
        while time.perf_counter() < deadline:
            count = counter.poll()
            now = time.perf_counter()
            if count != last_count:
                last_count, last_change = count, now
            if count >= len(payloads) or now - last_change > 1.0:
                break
            time.sleep(0.002)
        from_channel = counter.poll()
        pubsub_rate = from_channel / max(last_change - start, 1e-6)
        for i in range(0, len(payloads), 1000):
            client.rpush(STAGING, *payloads[i : i + 1000])
        client.rename(STAGING, QUEUE)
        start = time.perf_counter()
        wait_until(
            lambda: counter.poll() >= from_channel + len(payloads),
            60 + len(payloads) / 500,
            0.002,
            f"{name} to pop {len(payloads)} messages",
        )
        queue_rate = len(payloads) / (time.perf_counter() - start)
    finally:
        received = _stop(proc, counter)
        client.close()
    if received != from_channel + len(payloads):
        raise RuntimeError(
            f"{name}: {received} received, expected {from_channel} + {len(payloads)}"
        )
    return pubsub_rate, len(payloads) - from_channel, queue_rate


def run(ctx: Context) -> list[Row]:
    """Go beside redis-py, pub/sub and queue."""
    mode = ctx.mode
    ctx.log("subscriber: building go-subscriber")
    subscribers = {
        "go-subscriber": [str(build_go(ctx))],
        "redis-py": [str(BIN / "python"), "-m", "benchmarks.py_subscriber"],
    }
    payloads = messages(mode.sub_messages)
    rates: dict[str, list[float]] = {}
    lost: dict[str, list[float]] = {}
    queue: dict[str, list[float]] = {}
    for name, argv in subscribers.items():
        ctx.log(f"subscriber: {name}, {len(payloads)} messages per run")
        for _ in range(mode.repeats):
            rate, missing, popped = one_run(ctx, argv, name, payloads)
            rates.setdefault(name, []).append(rate)
            lost.setdefault(name, []).append(float(missing))
            queue.setdefault(name, []).append(popped)
    note = f"{len(payloads):,} messages, pipelined publisher"
    return [
        Row(
            SECTION,
            "go-subscriber, pub/sub, received",
            "msgs/s",
            rates["go-subscriber"],
            "redis-py subscriber, same work",
            rates["redis-py"],
            note,
        ),
        Row(
            SECTION,
            "go-subscriber, pub/sub, lost",
            "msgs",
            lost["go-subscriber"],
            "redis-py subscriber lost",
            lost["redis-py"],
        ),
        Row(
            SECTION,
            "go-subscriber, queue (BLPOP per message)",
            "msgs/s",
            queue["go-subscriber"],
            "redis-py subscriber, same work",
            queue["redis-py"],
            f"{len(payloads):,} messages",
        ),
    ]
