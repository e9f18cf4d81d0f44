"""The quick fault scoreboard (``python -m chaos --quick``) as a test.

One real stack (Redis with AOF, orders-api, two workers per queue, smtp-sink, SQLite),
then each quick scenario in turn: consumers SIGKILLed, Redis SIGKILLed, a power loss
emulated under ``appendfsync everysec`` and a FLUSHALL mid-intake (both completed by
the relays' automatic reconciliation: nobody runs ``orders-relay --reconcile``), Redis
down during intake, Redis frozen, Redis out of memory (every write refused), orders-api
SIGKILLed mid-request, the database locked, a
slow consumer, a consumer partitioned from Redis. Every scenario that promises it must
end with zero lost orders and zero duplicated effects; none may see a 5xx other than
503; and every fault must have fired by its own count (SIGKILLs landed, AOF bytes
dropped, keys flushed, bytes swallowed...), the power loss and the flush leaving orders
stuck for the automatic reconciliation to complete. ``pytest -s`` prints the table.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from chaos.scoreboard import QUICK, run, table

pytestmark = pytest.mark.e2e


def test_quick_scoreboard(tmp_path: Path) -> None:
    results = run(QUICK, tmp_path / "chaos", quick=True)
    print("\n" + table(results))
    assert len(results) >= 8
    for result in results:
        name = result.scenario.name
        assert result.server_errors == [], (name, result.server_errors)
        assert result.fired > 0, f"{name}: the fault did not fire ({result.fired_what})"
        if result.scenario.reconcile:
            assert (result.lost_before_reconcile or 0) > 0, (
                f"{name}: no order was incomplete before reconcile: it reconciled nothing"
            )
        assert result.proved, (name, result.notes)
        assert result.placed == result.asked, (result.scenario.name, result.notes)
        if result.scenario.promises_zero:
            assert result.lost == 0, (result.scenario.name, result.notes)
            assert result.duplicated == 0, (result.scenario.name, result.notes)
    names = " ".join(r.scenario.name for r in results)
    for fault in ("consumers SIGKILLed", "power loss", "FLUSHALL", "Redis down",
                  "out of memory", "orders-api SIGKILLed",
                  "database locked", "slow consumer", "partitioned"):  # fmt: skip
        assert fault in names
