"""The least-privilege Redis ACL for this project's processes.

Redis 6+ ACLs name what a user may run (commands), touch (key patterns) and
subscribe/publish to (channels). The rules below grant exactly what the hello
publisher, orders-api, orders-relay, the consumers and the Go subscriber use, checked by
tests/integration/test_redis_acl.py against a real server (it also asserts that the
server logged no denied command). The dashboard and ``orders-admin`` (SCAN, INFO) are
operator tools: run them as a separate user with more rights.

``python -m orders.acl USER PASSWORD`` prints the line for a Redis ``aclfile`` or
``redis.conf``::

    user orders on >PASSWORD resetkeys ~queue:* ... resetchannels &messages ... -@all +ping ...

and ``REDIS_URL=redis://orders:PASSWORD@host:6379/0`` (``rediss://`` with TLS) is what
every process is then given. Turn the ``default`` user off (``user default off``) so
that nothing connects without a password.
"""

from __future__ import annotations

import sys

from orders import keys

KEY_PATTERNS: tuple[str, ...] = (
    "queue:*",  # every key of every reliable queue (keys.pending, processing, ...)
    keys.HELLO_QUEUE,
    keys.rate_limit("*"),
)
"""Key patterns (``~``): nothing else exists in this project's keyspace."""

CHANNELS: tuple[str, ...] = (keys.HELLO_CHANNEL, keys.ORDER_EVENTS_CHANNEL)
"""Pub/sub channels (``&``): PUBLISH and SUBSCRIBE need them."""

COMMANDS: tuple[str, ...] = (
    # connecting: redis-py and go-redis (HELLO 3 with AUTH, else AUTH)
    "ping", "hello", "auth", "select", "client|setinfo", "client|setname",
    "client|maint_notifications",  # go-redis asks; servers without the feature say no
    # the hello publisher and the Go subscriber
    "publish", "subscribe", "unsubscribe", "rpush", "blpop",
    # the reliable queue (consumers/queue.py) and the publisher's Lua scripts
    "evalsha", "eval", "script|load", "script|exists",
    "blmove", "lmove", "lrem", "lpush", "llen", "lrange",
    "set", "del", "exists", "sadd", "srem", "smembers",
    "hincrby", "hdel", "hgetall", "zadd", "zrem", "zrangebyscore", "zcard",
    "multi", "exec", "discard",
    # the API's rate limiter (orders/ratelimit.py)
    "time", "hmget", "hset", "pexpire",
)  # fmt: skip
"""Commands (``+``), also those run inside Lua scripts (Redis checks those too)."""


def rules() -> list[str]:
    """The ACL rules of the project's user, without ``on`` and the password."""
    return [
        "resetkeys",
        *(f"~{p}" for p in KEY_PATTERNS),
        "resetchannels",
        *(f"&{c}" for c in CHANNELS),
        "-@all",
        *(f"+{c}" for c in COMMANDS),
    ]


def user_line(user: str, password: str) -> str:
    """One ``user`` line for an aclfile."""
    return " ".join(["user", user, "on", f">{password}", *rules()])


def main(argv: list[str] | None = None) -> int:
    """Print the ACL user line: ``python -m orders.acl USER PASSWORD``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m orders.acl USER PASSWORD", file=sys.stderr)
        return 2
    print(user_line(*args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
