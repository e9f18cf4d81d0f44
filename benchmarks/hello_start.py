"""How long the Hello publisher takes from process start to "Connected to Redis".

The limit is the tutorial's own publisher as it stands in the seed: a script that
imports redis-py and the standard library, builds a client, PINGs and prints the line
(:data:`ORIGINAL`, run with the same interpreter). Ours imports only the messaging core
(no SQLAlchemy, no Flask); both are started the same way against the same Redis, in
turn, several times.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from benchmarks.harness import BIN, Context, Row

SECTION = "hello"

ORIGINAL = """
import json, os, time, uuid
from datetime import datetime
import redis
host, port = os.getenv("REDIS_HOST", "localhost"), int(os.getenv("REDIS_PORT", "6379"))
r = redis.Redis(host=host, port=port, decode_responses=True)
r.ping()
print(f"[{datetime.now().isoformat()}] Connected to Redis at {host}:{port}", flush=True)
"""
"""The seed's publisher up to its first line: imports, client, PING, print."""


def _time_to_connected(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "Connected to Redis" in line:
                return time.perf_counter() - started
        raise RuntimeError(f"{argv[0]} exited without connecting (code {proc.wait()})")
    finally:
        proc.kill()
        proc.wait()


def run(ctx: Context) -> list[Row]:
    """Start-to-connected of ``hello-publisher`` beside the seed's publisher, same run."""
    host, port = ctx.redis_url.removeprefix("redis://").split("/")[0].split(":")
    env = {**os.environ, "REDIS_HOST": host, "REDIS_PORT": port, "PUBLISH_INTERVAL": "60"}
    env.pop("REDIS_URL", None)
    ours: list[float] = []
    original: list[float] = []
    for _ in range(max(5, ctx.mode.repeats)):  # interleaved: both see the same machine
        original.append(_time_to_connected([sys.executable, "-c", ORIGINAL], env) * 1000)
        ours.append(_time_to_connected([str(BIN / "hello-publisher")], env) * 1000)
    ctx.log(f"hello: ours {sorted(ours)} ms, original {sorted(original)} ms")
    return [
        Row(
            SECTION,
            "hello-publisher: process start to 'Connected to Redis'",
            "ms",
            ours,
            "the seed's publisher (redis-py + stdlib), same run",
            original,
        )
    ]
