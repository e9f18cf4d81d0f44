"""The least-privilege Redis ACL for this project's processes.

Redis 6+ ACLs name what a user may run (commands), touch (key patterns) and
subscribe/publish to (channels). The rules below grant exactly what the hello
publisher, orders-api, orders-relay, the consumers and the Go subscriber use, checked by
tests/integration/test_redis_acl.py against a real server (it also asserts that the
server logged no denied command). The dashboard and ``orders-admin`` (SCAN, INFO) are
operator tools: run them as a separate user with more rights.

``python -m ops.acl USER PASSWORD [REDIS_VERSION]`` prints the line for a Redis
``aclfile`` or ``redis.conf`` (REDIS_VERSION, e.g. ``7.0``, defaults to 7.2 and later)::

    user orders on >PASSWORD resetkeys ~queue:* ... resetchannels &messages ... -@all +ping ...

and ``REDIS_URL=redis://orders:PASSWORD@host:6379/0`` (``rediss://`` with TLS) is what
every process is then given. Turn the ``default`` user off (``user default off``) so
that nothing connects without a password.
"""

from __future__ import annotations

import sys

from messaging import keys

KEY_PATTERNS: tuple[str, ...] = (
    keys.QUEUE_KEYS_PATTERN,  # every key of every reliable queue (pending, processing, ...)
    keys.HELLO_QUEUE,
    keys.rate_limit("*"),
    keys.RECONCILE_KEYS_PATTERN,  # the relays' reconciliation lock and per-order marks
)
"""Key patterns (``~``): nothing else exists in this project's keyspace."""

CHANNELS: tuple[str, ...] = (keys.HELLO_CHANNEL, keys.ORDER_EVENTS_CHANNEL)
"""Pub/sub channels (``&``): PUBLISH and SUBSCRIBE need them."""

COMMANDS: tuple[str, ...] = (
    # connecting: redis-py and go-redis (HELLO 3 with AUTH, else AUTH)
    "ping", "hello", "auth", "select", "client|setname",
    # the hello publisher and the Go subscriber
    "publish", "subscribe", "unsubscribe", "rpush", "blpop",
    # the reliable queue (consumers/queue.py) and the publisher's Lua scripts
    "evalsha", "eval", "script|load", "script|exists",
    "blmove", "lmove", "lrem", "lpush", "llen", "lrange", "ltrim",
    "get", "set", "del", "exists", "sadd", "srem", "smembers",
    "hincrby", "hdel", "hget", "hlen", "hgetall", "lindex",
    "zadd", "zrem", "zrangebyscore", "zrange", "zcard",
    "multi", "exec", "discard",
    # the API's rate limiter (orders/ratelimit.py)
    "time", "hmget", "hset", "pexpire",
)  # fmt: skip
"""Commands (``+``), also those run inside Lua scripts (Redis checks those too)."""

HANDSHAKE_SUBCOMMANDS: dict[str, tuple[int, int] | None] = {
    "client|setinfo": (7, 2),  # redis-py and go-redis send it on connect
    "client|maint_notifications": None,  # go-redis asks; no open-source Redis has it
}
"""Subcommands the clients try on connect (ignoring a refusal), with the first server
version that has them (None: none yet). Redis 6.2 checks the ACL before it looks a
subcommand up, so it needs them all for a clean ``ACL LOG``; Redis 7+ refuses to load
a rule naming a subcommand it does not have, and answers "unknown subcommand" (not an
ACL denial) to the command."""

NEWEST: tuple[int, int] = (7, 2)
"""The server version :func:`rules` assumes by default (7.2 and later are alike here)."""


def parse_version(raw: str) -> tuple[int, int]:
    """``"7.0"`` or ``"7.0.15"`` as ``(7, 0)``; ValueError otherwise."""
    parts = raw.strip().split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"invalid Redis version {raw!r}: expected MAJOR.MINOR, e.g. 7.2")
    return int(parts[0]), int(parts[1])


def _handshake(version: tuple[int, int]) -> list[str]:
    if version < (7, 0):
        return list(HANDSHAKE_SUBCOMMANDS)
    return [c for c, since in HANDSHAKE_SUBCOMMANDS.items() if since and since <= version]


def rules(server_version: tuple[int, int] = NEWEST) -> list[str]:
    """The ACL rules of the project's user, without ``on`` and the password.

    ``server_version`` is the Redis server's (major, minor): the rules must name only
    subcommands that server has (see :data:`HANDSHAKE_SUBCOMMANDS`).
    """
    return [
        "resetkeys",
        *(f"~{p}" for p in KEY_PATTERNS),
        "resetchannels",
        *(f"&{c}" for c in CHANNELS),
        "-@all",
        *(f"+{c}" for c in COMMANDS),
        *(f"+{c}" for c in _handshake(server_version)),
    ]


def user_line(user: str, password: str, server_version: tuple[int, int] = NEWEST) -> str:
    """One ``user`` line for an aclfile."""
    return " ".join(["user", user, "on", f">{password}", *rules(server_version)])


def main(argv: list[str] | None = None) -> int:
    """Print the ACL user line: ``python -m ops.acl USER PASSWORD [REDIS_VERSION]``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 3):
        print("usage: python -m ops.acl USER PASSWORD [REDIS_VERSION]", file=sys.stderr)
        return 2
    try:
        version = parse_version(args[2]) if len(args) == 3 else NEWEST
    except ValueError as exc:
        print(f"ops.acl: {exc}", file=sys.stderr)
        return 2
    print(user_line(args[0], args[1], version))
    return 0


if __name__ == "__main__":
    sys.exit(main())
