"""The scoreboard's "SMTP down 60 s" scenario as a test: a mail outage loses no email.

The real stack (chaos/stack.py: Redis with AOF, orders-api, two workers per queue,
smtp-sink, SQLite) places the quick run's orders while smtp-sink is stopped for a full
60 s, then started again. The consumers run with the chaos tuning: a retry budget
(CONSUMER_RETRY_SECONDS) of 20 s, shorter than the outage, so the emails that wait
longest are dead-lettered as transient during it and must come back by themselves.

Before retry budgets in time, the email queue spent its attempts within seconds and
dead-lettered those confirmations for good: orders lost, dead letters left. Now every
order ends with each of its emails exactly once, nothing is lost or doubled, no dead
letter is left, the sends really failed meanwhile (the fault fired) and transient
dead letters were revived. ``pytest -s`` prints the row.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from chaos.scoreboard import QUICK, run, table

pytestmark = pytest.mark.e2e


def test_smtp_down_60_s_loses_no_email(tmp_path: Path) -> None:
    [result] = run(QUICK, tmp_path / "chaos", only=["SMTP down 60 s"])
    print("\n" + table([result]))
    notes = "; ".join(result.notes)
    assert result.scenario.name == "SMTP down 60 s"
    assert result.fired > 0, f"no send was refused during the outage: {notes}"
    assert result.server_errors == []
    assert result.placed == result.asked, notes
    assert result.completed == result.asked, notes  # each order: all of its emails
    assert result.lost == 0, notes
    assert result.duplicated == 0, notes  # no second email of one step, no second outcome
    assert result.dead_lettered == 0, notes  # none left
    match = re.search(r"(\d+) dead-lettered as transient meanwhile, (\d+) .* revived", notes)
    assert match, notes
    dead, revived = int(match[1]), int(match[2])
    assert dead > 0 and revived >= dead, notes  # the revival, not only the budget, proved
