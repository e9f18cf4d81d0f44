"""Test helpers: deadline polling and real child processes with captured output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")
BIN = Path(sys.executable).parent


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "condition",
) -> T:
    """Poll until ``predicate()`` is truthy and return it; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


class Proc:
    """A real child process whose stdout+stderr go to a file we can read while it runs."""

    def __init__(
        self, argv: Sequence[str], env: dict[str, str], log_path: Path, cwd: Path | None = None
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
        with open(log_path, "wb") as out:
            self.popen = subprocess.Popen(
                self.argv,
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def lines(self) -> list[str]:
        return self.output().splitlines()

    def wait_output(self, needle: str, timeout: float = 15.0, count: int = 1) -> str:
        """Wait until ``needle`` appears ``count`` times in the output."""
        wait_for(
            lambda: self.output().count(needle) >= count or self._died(),
            timeout,
            message=f"{needle!r} x{count} in output of {self.argv[0]}",
        )
        if self.output().count(needle) < count:
            pytest.fail(f"{self.argv[0]} exited {self.popen.returncode}:\n{self.output()}")
        return self.output()

    def _died(self) -> bool:
        return self.popen.poll() is not None

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout)

    def kill(self) -> None:
        """SIGKILL, no goodbye."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
