"""The original Hello publisher: a JSON message every PUBLISH_INTERVAL seconds.

Behaviour and log lines are the tutorial's, word for word; what it got wrong is fixed:

- timestamps are UTC RFC 3339 with an offset (the original's zone-less local time was
  rejected by the Go subscriber's RFC 3339 parse);
- SIGTERM/SIGINT stop it within a second, not after the current sleep;
- an unknown PATTERN or a non-numeric port or interval is a one-line error and exit 2
  (the original silently published nothing, or crashed with a traceback);
- output is line-buffered, so container and ``make up`` logs show each line at once.

Run it as ``hello-publisher`` or ``python -m hello.publisher``.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import uuid
from types import FrameType
from typing import Any

import redis

from messaging import keys, logs
from messaging.config import EXIT_NO_REDIS, EXIT_OK, Settings, command_line, load_settings
from messaging.connection import connect_with_retries, redis_client

log = logging.getLogger("hello-publisher")

SENDER = "python-publisher"


def create_message(count: int) -> dict[str, Any]:
    """The Hello message number ``count`` (the envelope without type/version/data)."""
    return {
        "id": str(uuid.uuid4()),
        "timestamp": logs.utc_now_iso(),
        "message": f"Hello from Python #{count}",
        "sender": SENDER,
        "count": count,
    }


class HelloPublisher:
    """Publishes Hello messages to the channel and/or the list, per PATTERN."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.stop = threading.Event()
        self.message_count = 0

    def publish_message(self, message: dict[str, Any]) -> bool:
        """Send one message the way PATTERN says; log and return False on a Redis error."""
        payload = json.dumps(message)
        try:
            if self.settings.publishes:
                subscribers = self.client.publish(keys.HELLO_CHANNEL, payload)
                log.info(
                    "Published to channel '%s' (%s subscribers): %s",
                    keys.HELLO_CHANNEL, subscribers, message["message"],
                )  # fmt: skip
            if self.settings.queues:
                length = self.client.rpush(keys.HELLO_QUEUE, payload)
                log.info(
                    "Pushed to queue '%s' (length: %s): %s",
                    keys.HELLO_QUEUE, length, message["message"],
                )  # fmt: skip
        except redis.RedisError as exc:
            # Redis went away mid-run: log, keep the count, try again next tick.
            log.info("Failed to publish message: %s", exc)
            return False
        return True

    def run(self) -> int:
        """Connect (with retries), then publish until stopped. Returns the exit code."""
        log.info("Starting Python Publisher...")
        log.info("Pattern: %s", self.settings.pattern)
        log.info("Publish interval: %ss", self.settings.publish_interval)
        if not connect_with_retries(self.client, self.settings, self.stop):
            if self.stop.is_set():
                log.info("Publisher stopped. Total messages sent: %d", self.message_count)
                return EXIT_OK
            return EXIT_NO_REDIS
        while not self.stop.is_set():
            self.message_count += 1
            self.publish_message(create_message(self.message_count))
            # Event.wait instead of time.sleep: a signal ends the wait at once.
            self.stop.wait(self.settings.publish_interval)
        log.info("Publisher stopped. Total messages sent: %d", self.message_count)
        self.client.close()
        return EXIT_OK

    def handle_signal(self, signum: int, _frame: FrameType | None) -> None:
        """First SIGTERM/SIGINT: finish the current message and stop."""
        log.info("Received signal %d. Shutting down gracefully...", signum)
        self.stop.set()


def main(argv: list[str] | None = None) -> int:
    """Console script ``hello-publisher``."""
    command_line("hello-publisher", __doc__).parse_args(argv)  # only --help
    settings = load_settings("hello-publisher", Settings.from_env)
    logs.configure(settings.log_format, settings.log_level)
    publisher = HelloPublisher(redis_client(settings), settings)
    signal.signal(signal.SIGTERM, publisher.handle_signal)
    signal.signal(signal.SIGINT, publisher.handle_signal)
    return publisher.run()


if __name__ == "__main__":
    sys.exit(main())
