"""Run the benchmark suite: ``python -m benchmarks [--mode quick|full] [--only a,b]``.

Starts its own Redis server (no persistence, 127.0.0.1, free port) and databases in a
temporary directory, runs every section, prints one Markdown table of medians on
stdout (progress goes to stderr), and writes ``bench-results/latest.json`` and
``latest.md``. Exit 0 whatever the numbers; 1 only when a section failed for real (a
process died, work went missing, a tool is absent).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from benchmarks import (
    drain,
    e2e,
    hello_start,
    intake,
    priority,
    publish,
    streams,
    subscriber,
    tracing,
)
from benchmarks.harness import (
    MODES,
    Context,
    Row,
    environment,
    filesystem,
    markdown,
    write_results,
)
from devtools.redis_server import RedisServer

SECTIONS: dict[str, Callable[[Context], list[Row]]] = {
    "drain": drain.run,
    "priority": priority.run,
    "publish": publish.run,
    "intake": intake.run,
    "e2e": e2e.run,
    "subscriber": subscriber.run,
    "hello": hello_start.run,
    "streams": streams.run,
    "tracing": tracing.run,
}


def main(argv: list[str] | None = None) -> int:
    """Run the chosen sections; print and save the table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--mode", choices=sorted(MODES), default=os.environ.get("BENCH_MODE") or "quick"
    )
    parser.add_argument(
        "--only", default="", help=f"comma-separated sections: {', '.join(SECTIONS)}"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    chosen = [s for s in args.only.split(",") if s] or list(SECTIONS)
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}")
    mode = MODES[args.mode]

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    server = RedisServer(data_dir=work / "redis")
    server.data_dir.mkdir()  # type: ignore[union-attr]
    server.start()
    ctx = Context(mode=mode, work=work, redis_url=server.url)
    # The databases, the mail sink's files and Redis's directory live here: its file
    # system is part of what the figures measure (TMPDIR chooses it; README).
    meta = {
        "mode": mode.name,
        "environment": {**environment(), "work_filesystem": filesystem(work)},
        "sections": {},
    }
    rows: list[Row] = []
    failed: list[str] = []
    try:
        for name in chosen:
            section_start = time.perf_counter()
            try:
                rows += SECTIONS[name](ctx)
                status = "ok"
            except Exception as exc:  # a real error: report it, run the rest, exit 1
                traceback.print_exc()
                failed.append(name)
                status = f"failed: {type(exc).__name__}: {exc}"
            seconds = time.perf_counter() - section_start
            meta["sections"][name] = {"status": status, "seconds": round(seconds, 1)}
            ctx.log(f"{name}: {status} in {seconds:.1f}s")
    finally:
        ctx.close()
        server.stop()
        if args.keep or failed:
            ctx.log(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    wall = time.perf_counter() - started
    meta["wall_seconds"] = round(wall, 1)
    env = meta["environment"]
    header = (
        f"## Benchmarks, {mode.name} mode: {env['cpus']} CPUs, Python {env['python']}, "
        f"{env['redis'].split(' sha=')[0]}; work directory on {env['work_filesystem']};"
        f" {wall:.0f} s wall"
    )
    if failed:
        header += f"\n\nFAILED sections: {', '.join(failed)}"
    table = markdown(rows, header)
    print(table)
    path = write_results(rows, table, meta)
    ctx.log(f"results in {path} and {path.with_suffix('.md')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
