"""Logging to stdout in the original's format, or JSON lines.

Text lines look like the original tutorial's: ``[2026-11-28T10:15:02.123456+00:00] text``,
with the time in UTC. ``LOG_FORMAT=json`` writes one JSON object per line instead.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime


def utc_now_iso() -> str:
    """The current time as UTC RFC 3339 with offset (``...+00:00``)."""
    return datetime.now(UTC).isoformat()


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).isoformat()
        line = f"[{stamp}] {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("event_id", "order_id", "event_type", "queue", "worker", "trace_id"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(fmt: str = "text", level: str = "INFO") -> None:
    """Send every log record to stdout, line-buffered, in the chosen format."""
    # Line buffering even when stdout is a pipe (container logs, supervisor): the
    # original's output sat in a block buffer until the container stopped.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
