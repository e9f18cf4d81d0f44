"""The redis-py counterpart of go-subscriber, for the subscriber benchmark only.

Same work per message as the Go listener: parse the JSON envelope, write one display
line (one write call per line, as Go's unbuffered stdout does), count it. Environment:
``REDIS_URL``, ``PATTERN`` (``pubsub``, ``queue`` or ``both``), ``CHANNEL``, ``QUEUE``. Prints
``Subscriber stopped. Total messages received: N`` after SIGTERM, as go-subscriber does.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from types import FrameType

import redis


def display(raw: bytes | str, count: int, source: str) -> str:
    """The Go subscriber's display line (without its time formatting)."""
    msg = json.loads(raw)
    return (
        f"[{msg.get('timestamp', '')}] [{msg.get('sender', '')}] {msg.get('message', '')}"
        f" (ID: {msg.get('id', '')}) [Received #{count} from {source}]\n"
    )


def main() -> int:
    """Listen until SIGTERM; print the total."""
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    pattern = os.environ.get("PATTERN", "both")
    lock = threading.Lock()  # one count and one write at a time, as the Go subscriber
    received = 0

    def show(raw: bytes, source: str) -> None:
        nonlocal received
        with lock:
            received += 1
            sys.stdout.write(display(raw, received, source))
            sys.stdout.flush()

    def listen_queue(queue: str) -> None:
        sys.stdout.write(f"Starting queue subscriber on list '{queue}'\n")
        sys.stdout.flush()
        while not stop.is_set():
            item = client.blpop([queue], timeout=1)
            if item is not None:
                show(item[1], "queue")

    def listen_channel(channel: str) -> None:
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(channel)
        while not stop.is_set():
            message = pubsub.get_message(timeout=1.0)
            if message is not None:
                show(message["data"], "pub-sub")
        pubsub.close()

    threads = []
    if pattern in ("pubsub", "both"):
        threads.append(threading.Thread(target=listen_channel, args=(os.environ["CHANNEL"],)))
    if pattern in ("queue", "both"):
        threads.append(threading.Thread(target=listen_queue, args=(os.environ["QUEUE"],)))
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        for thread in threads:
            thread.join(0.2)
    out = sys.stdout
    out.write(f"Subscriber stopped. Total messages received: {received}\n")
    out.flush()
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
