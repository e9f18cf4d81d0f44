"""The chaos harness's slowdown probe: the factor that stretches settings-derived bounds.

The orphan-recovery scenario asserts a bound computed from the settings, multiplied by
how much slower than its CPU time CPU-bound work ran meanwhile. This test pins
down that the factor is a ratio of sums over the window asked for, never below 1. (A
test that a competing thread raises it was dropped: a thread waiting for the GIL waits
before its slice starts, not inside it, and one run measured 1.06.)
"""

from __future__ import annotations

from chaos.scoreboard import Slowdown


def test_the_factor_is_wall_over_cpu_summed_over_the_window_and_never_below_one() -> None:
    probe = Slowdown()
    probe._slices = [(10.0, 0.010, 0.005), (11.0, 0.030, 0.005), (20.0, 0.5, 0.005)]
    assert probe.between(9.5, 11.0) == (0.010 + 0.030) / 0.010
    assert probe.between(19.0, 20.0) == 100.0
    probe._slices = [(10.0, 0.004, 0.005)]  # timer granularity: wall a hair under cpu
    assert probe.between(0.0, 30.0) == 1.0
    assert probe.between(50.0, 60.0) == 1.0  # no slice in the window: no stretch
