"""benchmarks.server_sweep's arguments: bad ones are one line and exit 2."""

from __future__ import annotations

import pytest

from benchmarks.server_sweep import main, parse_configs
from tests.helpers import usage_error


def test_configs_parse() -> None:
    assert parse_configs("2x4, 1x8") == [(2, 4), (1, 8)]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--configs", "2x"], "'2x' is not WORKERSxTHREADS"),
        (["--configs", "2x4,abc"], "'abc' is not WORKERSxTHREADS"),
        (["--configs", "0x4"], "workers and threads must be 1 to 64"),
        (["--repeats", "0"], "'0' is not above zero"),
        (["--repeats", "2.5"], "'2.5' is not an integer"),
        (["--seconds", "soon"], "'soon' is not a number"),
        (["--seconds", "-1"], "'-1' is not above zero"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert needle in usage_error(main, argv, capsys)
