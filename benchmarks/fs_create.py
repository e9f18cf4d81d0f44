"""What one new file costs on a file system: CPU per file, one fresh directory at a time.

``smtp-sink`` stores each email it accepts as a file (a temporary name, then a rename),
as the e2e rows' pipeline does 400 times a second at 200 orders/s. On this project's
2-core VM (ext4, 2026-12-05) a file cost 24-49 µs of CPU in most new directories and
260-650 µs in others, in the same minute: which block group ext4 puts
a new directory in decides it. A run whose mail directory lands in a slow group spends
about 0.5 ms more CPU per order in smtp-sink, which the pipeline at 87% of the machine
does not have (README, issue 12, session 29). This prints that cost for the directory
given (TMPDIR's by default), so a run can be read against it::

    python -m benchmarks.fs_create                 # TMPDIR's file system
    python -m benchmarks.fs_create --dir /dev/shm  # tmpfs, for comparison
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import filesystem
from messaging.config import arg_int

BODY = b"x" * 3000
"""About the size of one of the consumer's emails."""


def cost_per_file(directory: Path, files: int) -> float:
    """CPU seconds per file written the way smtp-sink writes one (temporary, rename)."""
    started = time.process_time()
    for n in range(files):
        tmp = directory / f"{n}.eml.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, BODY)
        finally:
            os.close(fd)
        os.replace(tmp, directory / f"{n}.eml")
    return (time.process_time() - started) / files


def main(argv: list[str] | None = None) -> int:
    """Measure, print one line per directory and a summary."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fs_create",
        description="CPU per new file, in several fresh directories of one file system.",
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to make the directories (TMPDIR's)"
    )
    parser.add_argument("--dirs", type=arg_int(1, 1000), default=8, help="fresh directories (8)")
    parser.add_argument(
        "--files", type=arg_int(1, 1_000_000), default=3000, help="files in each (3000)"
    )
    args = parser.parse_args(argv)
    if args.dir is not None and not args.dir.is_dir():
        parser.error(f"--dir {str(args.dir)!r} is not a directory")
    base = Path(tempfile.mkdtemp(prefix="fs-create-", dir=args.dir))
    try:
        costs = []
        for k in range(args.dirs):
            directory = base / f"d{k}"
            directory.mkdir()
            cost = cost_per_file(directory, args.files)
            costs.append(cost)
            print(f"directory {k + 1}: {cost * 1e6:,.0f} µs of CPU per file")
        print(
            f"{filesystem(base)} at {base.parent}: median {statistics.median(costs) * 1e6:,.0f}"
            f" µs, min {min(costs) * 1e6:,.0f}, max {max(costs) * 1e6:,.0f} µs per file"
            f" ({args.files} files in each of {args.dirs} new directories)"
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
