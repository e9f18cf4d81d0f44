"""What every benchmark shares: modes, repeated measurements, child processes, the table.

A benchmark module exposes ``run(ctx) -> list[Row]``. A :class:`Row` holds every
repeat's value of one figure and, beside it, the values of its limit measured in the
same run (the raw Redis loop, the bare web stack ...), so the table shows medians and
their ratio. Nothing here asserts a timing: the suite prints and exits 0 unless
something actually broke.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from devtools.procs import Proc, http_ok, wait_until

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RESULTS_DIR = ROOT / "bench-results"


@dataclass(frozen=True)
class Mode:
    """Sizes of one suite run. ``quick`` is what CI runs (< 2 minutes on 2 cores)."""

    name: str
    repeats: int
    """Runs of each throughput figure (the table shows the median)."""
    drain_jobs: int
    drain_batches: tuple[int, ...]
    drain_processes: tuple[int, ...]
    drain_info_logs: bool
    payment_jobs: int
    """Charges per run of the payment scaling rows (1/2/4 real payment processes)."""
    publish_events: int
    http_seconds: float
    http_clients: int
    http_repeats: int
    postgres: bool
    e2e_rate: int
    e2e_seconds: float
    e2e_repeats: int
    e2e_deadline: float
    """Seconds after the load stops within which every order must have every effect."""
    sub_messages: int


MODES = {
    "quick": Mode(
        name="quick",
        repeats=3,
        drain_jobs=10_000,
        drain_batches=(100, 1),
        drain_processes=(1, 2, 4),
        drain_info_logs=False,
        payment_jobs=400,
        publish_events=3_000,
        http_seconds=1.5,
        http_clients=16,
        http_repeats=2,
        postgres=True,
        e2e_rate=50,
        e2e_seconds=5.0,
        e2e_repeats=1,
        e2e_deadline=30.0,
        sub_messages=5_000,
    ),
    "full": Mode(
        name="full",
        repeats=5,
        drain_jobs=50_000,
        drain_batches=(100, 10, 1),
        drain_processes=(1, 2, 4),
        drain_info_logs=True,
        payment_jobs=2_000,
        publish_events=20_000,
        http_seconds=10.0,
        http_clients=16,
        http_repeats=3,
        postgres=True,
        e2e_rate=200,
        e2e_seconds=30.0,
        e2e_repeats=2,
        e2e_deadline=90.0,
        sub_messages=50_000,
    ),
}


@dataclass
class Row:
    """One figure of the table: every run's value, and its limit's values from this run."""

    section: str
    name: str
    unit: str
    values: list[float]
    limit_name: str = ""
    limit_values: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def limit_median(self) -> float | None:
        return statistics.median(self.limit_values) if self.limit_values else None

    @property
    def ratio(self) -> float | None:
        """median / limit median (for latencies above 1 means slower than the limit)."""
        limit = self.limit_median
        if not limit:
            return None
        return self.median / limit

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(median=self.median, limit_median=self.limit_median, ratio=self.ratio)
        return data


@dataclass
class Context:
    """What a benchmark gets: the mode, a scratch directory, the Redis URL, a log."""

    mode: Mode
    work: Path
    redis_url: str
    _postgres: Any = None
    _postgres_error: str = ""
    _databases: int = 0

    def postgres_url(self) -> str | None:
        """A new empty PostgreSQL database, or None (see :attr:`postgres_skipped`).

        The cluster (tests/orders_app.py's throwaway one: fsync off, trust auth) starts
        on first use and stops with :meth:`close`.
        """
        if not self.mode.postgres or self._postgres_error:
            return None
        if self._postgres is None:
            from tests.orders_app import PostgresCluster, find_postgres_bin

            bin_dir = find_postgres_bin()
            if bin_dir is None:
                self._postgres_error = "no PostgreSQL binaries (initdb, pg_ctl) found"
                return None
            cluster = PostgresCluster(bin_dir)
            try:
                cluster.start()
            except (subprocess.CalledProcessError, OSError) as exc:
                cluster.stop()
                self._postgres_error = f"PostgreSQL did not start: {exc}"
                self.log(self._postgres_error)
                return None
            self._postgres = cluster
        return str(self._postgres.create_database())

    @property
    def postgres_skipped(self) -> str:
        """Why PostgreSQL rows are missing ('' when they are not)."""
        return self._postgres_error or ("" if self.mode.postgres else "off in this mode")

    def close(self) -> None:
        """Stop what the context started (the PostgreSQL cluster)."""
        if self._postgres is not None:
            self._postgres.stop()
            self._postgres = None

    def log(self, text: str) -> None:
        """Progress on stderr (the table is the only thing on stdout)."""
        print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    def scratch(self, name: str) -> Path:
        """A new empty directory under the run's work directory."""
        path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.work))
        return path


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU of these processes so far, from ``/proc`` (exited ones count 0)."""
    return sum(cpu_user_system(pids))


def cpu_user_system(pids: Sequence[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of these processes so far, from ``/proc`` (exited ones
    count 0): the time in their own code, and the kernel's on their behalf (syscalls)."""
    user = system = 0.0
    for pid in pids:
        found = stat_cpu(Path(f"/proc/{pid}/stat"))
        if found is not None:
            user += found[0]
            system += found[1]
    return user, system


def stat_cpu(stat: Path) -> tuple[float, float] | None:
    """(user, system) CPU seconds from one ``/proc/<pid>/stat`` or
    ``/proc/<pid>/task/<tid>/stat`` file; None when it is gone (exited)."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick  # utime, stime (after pid, comm)


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (gunicorn's workers under its master)."""
    found = [pid]
    for child in subprocess.run(
        ["pgrep", "-P", str(pid)], capture_output=True, text=True
    ).stdout.split():
        found += process_tree(int(child))
    return found


def machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, every core, from /proc/stat.

    Busy is everything but idle and iowait, steal included: the time a virtual machine's
    cores ran someone else's work is time our processes could not run.
    """
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq + steal) / tick, steal / tick


def repeat(times: int, measure: Callable[[], float]) -> list[float]:
    """Run ``measure`` ``times`` times; the values in run order."""
    return [measure() for _ in range(times)]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), nearest-rank on the sorted values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def wait_http_ok(url: str, proc: Proc, timeout: float = 30.0) -> None:
    """Poll ``url`` until it answers 200 (the server is up); fail early if ``proc`` exits."""

    def ok() -> bool:
        proc.check_alive()
        return http_ok(url, timeout=1)

    wait_until(ok, timeout, 0.05, f"{url} to answer 200")


def fmt(value: float | None, unit: str = "") -> str:
    """A number for the table: thousands separators, sensible decimals."""
    if value is None or value != value:  # None or nan
        return "-"
    if unit == "x" or abs(value) < 10:
        return f"{value:,.2f}"
    if abs(value) < 100:
        return f"{value:,.1f}"
    return f"{value:,.0f}"


def markdown(rows: Sequence[Row], header: str) -> str:
    """The results as a Markdown table (medians, limits, ratios)."""
    lines = [
        header,
        "",
        "| # | measurement | median | unit | limit (same run) | limit median | ratio | runs |",
        "|---|---|---:|---|---|---:|---:|---:|",
    ]
    for row in rows:
        name = row.name + (f" ({row.note})" if row.note else "")
        ratio = row.ratio
        lines.append(
            f"| {row.section} | {name} | {fmt(row.median)} | {row.unit} | {row.limit_name or '-'}"
            f" | {fmt(row.limit_median)} | {fmt(ratio, 'x') if ratio is not None else '-'}"
            f" | {len(row.values)} |"
        )
    return "\n".join(lines) + "\n"


def filesystem(path: Path) -> str:
    """The type of the file system holding ``path`` (``ext4``, ``tmpfs`` ...), from
    ``/proc/mounts``; "unknown" where there is none."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "unknown"
    target = str(path.resolve())
    best, kind = "", "unknown"
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, kind = point, fields[2]
    return kind


def environment() -> dict[str, Any]:
    """What the figures depend on: machine, Python, Redis binary."""
    from devtools.redis_server import find_binary

    redis_version = subprocess.run(
        [find_binary(), "--version"], capture_output=True, text=True
    ).stdout.strip()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "redis": redis_version,
        "loadavg_at_start": load,
    }


def write_results(rows: Sequence[Row], table: str, meta: dict[str, Any]) -> Path:
    """bench-results/latest.json and latest.md (the directory is gitignored)."""
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "latest.md").write_text(table)
    path = RESULTS_DIR / "latest.json"
    path.write_text(json.dumps({**meta, "rows": [r.to_json() for r in rows]}, indent=2) + "\n")
    return path
