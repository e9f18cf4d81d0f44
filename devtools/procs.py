"""Child processes and deadline polling, shared by tests, chaos and benchmarks.

:func:`wait_until` polls a predicate until it is truthy or raises :class:`Timeout`;
:class:`Proc` is a real child process (own session, output to a log file) that can be
read while it runs, stopped with SIGTERM or SIGKILLed; :func:`http_ok` asks a URL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class Timeout(AssertionError):
    """A deadline passed while waiting for a condition (pytest reports it as a failure)."""


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.05,
    message: str = "condition",
) -> T:
    """Poll ``predicate`` until it is truthy (returned) or raise :class:`Timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise Timeout(f"timed out after {timeout:g}s waiting for {message}")
        time.sleep(interval)


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when GET ``url`` answers 200; False on any other answer or a network error."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (loopback)
            return int(response.status) == 200
    except OSError:  # URLError, HTTPError, ConnectionError, TimeoutError
        return False


class Proc:
    """A child process in its own session whose stdout+stderr go to ``log_path``.

    ``env`` is merged over ``os.environ`` (with ``PYTHONUNBUFFERED=1``); ``append`` keeps
    what an earlier process wrote to the same log.
    """

    def __init__(
        self,
        argv: Sequence[str],
        env: dict[str, str],
        log_path: Path,
        cwd: Path | None = None,
        *,
        append: bool = False,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        with open(log_path, "ab" if append else "wb") as out:
            self.popen = subprocess.Popen(
                self.argv,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def lines(self) -> list[str]:
        return self.output().splitlines()

    def check_alive(self) -> None:
        """Raise RuntimeError with the output's tail when the process has exited."""
        if not self.alive():
            tail = self.output()[-2000:]
            raise RuntimeError(f"{self.argv[0]} exited {self.popen.returncode}:\n{tail}")

    def wait_output(self, needle: str, timeout: float = 15.0, count: int = 1) -> str:
        """Wait until ``needle`` appears ``count`` times in the output; returns the output.

        Raises :class:`Timeout` at the deadline or when the process exits first.
        """
        wait_until(
            lambda: self.output().count(needle) >= count or not self.alive(),
            timeout,
            0.02,
            f"{needle!r} x{count} in output of {self.argv[0]}",
        )
        output = self.output()
        if output.count(needle) < count:
            raise Timeout(f"{self.argv[0]} exited {self.popen.returncode}:\n{output}")
        return output

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; SIGKILL at the deadline. Returns the exit code."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group (gunicorn's workers too): no goodbye."""
        if self.alive():
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.popen.wait()


def terminate_all(procs: Sequence[Proc], timeout: float = 20.0) -> list[int]:
    """SIGTERM every live process at once, then wait for each; SIGKILL at the deadline.

    One at a time, a stack of ten processes took the sum of their graceful exits (a
    consumer finishes its take timeout, gunicorn its workers): seconds per test.
    Returns the exit code of every process of ``procs``, in order (one that had exited
    before: the code it exited with).
    """
    for proc in procs:
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    codes = []
    for proc in procs:  # never a second SIGTERM: to a consumer that means "exit at once"
        try:
            codes.append(proc.popen.wait(max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(proc.popen.returncode)
    return codes
