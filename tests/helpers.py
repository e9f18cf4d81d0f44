"""Test helpers: deadline polling, real child processes (see devtools/procs.py) and an
in-process SMTP sink."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from consumers import smtp_sink
from devtools.procs import Proc, Timeout, wait_until

__all__ = ["BIN", "Proc", "wait_for"]

T = TypeVar("T")
BIN = Path(sys.executable).parent


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "condition",
) -> T:
    """Poll until ``predicate()`` is truthy and return it; fail the test at the deadline."""
    try:
        return wait_until(predicate, timeout, interval, message)
    except Timeout as exc:
        pytest.fail(str(exc))


class RunningSink:
    """An ``smtp-sink`` server on its own event loop in a thread of this process."""

    def __init__(self, directory: Path, limits: smtp_sink.Limits) -> None:
        self.directory = directory
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.sink = smtp_sink.Sink(directory, limits)
        started = asyncio.run_coroutine_threadsafe(self.sink.start("127.0.0.1", 0), self.loop)
        self.port: int = started.result(10)

    def stored(self) -> list[bytes]:
        """The stored messages, oldest first."""
        return [path.read_bytes() for path in sorted(self.directory.glob("*.eml"))]

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.sink.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def usage_error(
    main: Callable[[list[str]], int], argv: list[str], capsys: pytest.CaptureFixture[str]
) -> str:
    """Run a command's ``main`` with bad ``argv``: it must exit 2 with argparse's one-line
    error and no traceback; returns that line."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]
