"""The HTTP load tool: ``hey`` (github.com/rakyll/hey), installed into .venv/bin on first use.

Every request's timing comes from ``hey -o csv``, so the percentiles are computed here
from all requests, not read off hey's histogram.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness import BIN, percentile

HEY_MODULE = "github.com/rakyll/hey@v0.1.5"
"""Pinned: the same tool version on every machine."""


def ensure_hey() -> Path:
    """The hey binary in the virtual environment; ``go install`` it when missing."""
    binary = BIN / "hey"
    if binary.exists():
        return binary
    go = shutil.which("go")
    if go is None:
        raise RuntimeError("hey is missing and there is no Go toolchain to install it")
    subprocess.run(
        [go, "install", HEY_MODULE],
        env={**os.environ, "GOBIN": str(BIN)},
        check=True,
        capture_output=True,
        timeout=600,
    )
    return binary


@dataclass(frozen=True)
class Load:
    """What one hey run measured."""

    seconds: float
    ok: int
    errors: int
    latencies_ms: list[float]

    @property
    def rate(self) -> float:
        """Successful requests per second."""
        return self.ok / self.seconds if self.seconds else 0.0

    def p(self, q: float) -> float:
        """Latency percentile of the successful requests, in ms."""
        return percentile(self.latencies_ms, q)


def post(
    url: str,
    body: Path,
    *,
    seconds: float | None = None,
    requests: int | None = None,
    clients: int = 16,
    rate_per_client: float = 0,
    ok_status: int = 201,
) -> Load:
    """POST ``body`` (JSON) to ``url`` for ``seconds`` (or ``requests`` times) with hey."""
    argv = [str(ensure_hey()), "-c", str(clients), "-m", "POST", "-T", "application/json"]
    argv += ["-D", str(body), "-o", "csv", "-t", "30"]
    argv += ["-z", f"{seconds}s"] if seconds else ["-n", str(requests or 200)]
    if rate_per_client:
        argv += ["-q", str(rate_per_client)]
    out = subprocess.run(
        [*argv, url], check=True, capture_output=True, text=True, timeout=(seconds or 60) + 120
    ).stdout
    ok = errors = 0
    latencies: list[float] = []
    end = 0.0
    for record in csv.DictReader(io.StringIO(out)):
        response = float(record["response-time"])
        end = max(end, float(record["offset"]) + response)
        if int(record["status-code"]) == ok_status:
            ok += 1
            latencies.append(response * 1000)
        else:
            errors += 1
    return Load(seconds=end, ok=ok, errors=errors, latencies_ms=latencies)
