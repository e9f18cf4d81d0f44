"""Test helpers: deadline polling and real child processes (see devtools/procs.py)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

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
