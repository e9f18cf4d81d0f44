"""The HTTP load tool: ``vegeta`` (github.com/tsenart/vegeta), put in .venv/bin on first use.

Why vegeta: every request carries its own ``Idempotency-Key`` (as a real client's
retries must), which needs a target per request: vegeta reads them lazily from stdin
(JSON targets) while a thread here writes a new key for each. It also offers a true
open-loop constant rate (``-rate 200/s``: requests start on schedule whether or not
earlier ones have answered), which is what the end-to-end rows offer, and a closed
loop of N workers (``-rate 0 -max-workers N``) for the capacity rows.

Every request's timing comes from ``vegeta encode --to csv``, so the percentiles are
computed here from all requests, not read off a histogram.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness import BIN, percentile

VEGETA_MODULE = "github.com/tsenart/vegeta/v12@v12.13.0"
"""Pinned: the same tool version on every machine."""


def ensure_vegeta() -> Path:
    """The vegeta binary in the virtual environment; ``go install`` it when missing."""
    binary = BIN / "vegeta"
    if binary.exists():
        return binary
    go = shutil.which("go")
    if go is None:
        raise RuntimeError("vegeta is missing and there is no Go toolchain to install it")
    subprocess.run(
        [go, "install", VEGETA_MODULE],
        env={**os.environ, "GOBIN": str(BIN)},
        check=True,
        capture_output=True,
        timeout=600,
    )
    return binary


@dataclass(frozen=True)
class Load:
    """What one vegeta run measured."""

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


def _write_targets(stream: io.BufferedWriter, url: str, body: bytes, prefix: str) -> None:
    """JSON targets, one per line, each with a new Idempotency-Key, until vegeta stops."""
    encoded = base64.b64encode(body).decode()
    head = json.dumps({"method": "POST", "url": url, "body": encoded})[:-1]
    content_type = '"Content-Type": ["application/json"]'
    n = 0
    try:
        while True:
            lines = []
            for _ in range(256):
                n += 1
                key = json.dumps([f"{prefix}-{n}"])
                lines.append(f'{head}, "header": {{{content_type}, "Idempotency-Key": {key}}}}}\n')
            stream.write("".join(lines).encode())
    except (BrokenPipeError, ValueError, OSError):
        pass  # vegeta finished and closed its stdin


def post(
    url: str,
    body: Path,
    *,
    seconds: float | None = None,
    requests: int | None = None,
    clients: int = 16,
    rate: float = 0,
    ok_status: int = 201,
) -> Load:
    """POST ``body`` (JSON) to ``url``, a new Idempotency-Key each time.

    ``rate`` > 0: that many requests a second, open loop; 0: ``clients`` workers, each
    sending its next request when the previous one answered (the capacity test). For
    ``seconds`` or, when not given, ``requests`` requests.
    """
    if seconds is None:
        seconds = float(requests or 200) / (rate or 200.0)
    argv = [str(ensure_vegeta()), "attack", "-lazy", "-format", "json", "-timeout", "30s"]
    argv += ["-duration", f"{seconds}s", "-keepalive"]
    if rate:
        argv += ["-rate", f"{rate:g}/1s", "-workers", str(clients)]
    else:
        argv += ["-rate", "0", "-workers", str(clients), "-max-workers", str(clients)]
    with tempfile.TemporaryDirectory(prefix="vegeta-") as tmp:
        results = Path(tmp) / "results.bin"
        errors_file = Path(tmp) / "stderr.txt"
        with errors_file.open("wb") as stderr:
            proc = subprocess.Popen(
                [*argv, "-output", str(results)], stdin=subprocess.PIPE, stderr=stderr
            )
        assert proc.stdin is not None
        # Not communicate(): it would close stdin, which ends a lazy attack at once.
        writer = threading.Thread(
            target=_write_targets,
            args=(proc.stdin, url, body.read_bytes(), uuid.uuid4().hex[:12]),
            daemon=True,
        )
        writer.start()
        try:
            proc.wait(timeout=seconds + 120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        finally:
            writer.join(5)  # it stops on the broken pipe once vegeta exited
            with contextlib.suppress(OSError):
                proc.stdin.close()
        if proc.returncode != 0:
            raise RuntimeError(f"vegeta attack failed: {errors_file.read_text().strip()}")
        out = subprocess.run(
            [str(ensure_vegeta()), "encode", "--to", "csv", str(results)],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    ok = errors = 0
    latencies: list[float] = []
    start = end = 0.0
    for record in csv.reader(io.StringIO(out)):
        began = int(record[0]) / 1e9
        latency = int(record[2]) / 1e9
        start = began if not start else min(start, began)
        end = max(end, began + latency)
        if int(record[1]) == ok_status:
            ok += 1
            latencies.append(latency * 1000)
        else:
            errors += 1
    return Load(seconds=end - start, ok=ok, errors=errors, latencies_ms=latencies)
