"""The chaos harness's slowdown probe: the factor that stretches settings-derived bounds.

The orphan-recovery scenario asserts a bound computed from the settings, multiplied by
how much slower than its CPU time CPU-bound work ran meanwhile. These tests pin down
that the factor is a ratio of sums over the window asked for, and that a competitor
for the CPU (here a thread holding the GIL) really raises it.
"""

from __future__ import annotations

import threading
import time

from chaos.scoreboard import Slowdown


def test_the_factor_is_wall_over_cpu_summed_over_the_window_and_never_below_one() -> None:
    probe = Slowdown()
    probe._slices = [(10.0, 0.010, 0.005), (11.0, 0.030, 0.005), (20.0, 0.5, 0.005)]
    assert probe.between(9.5, 11.0) == (0.010 + 0.030) / 0.010
    assert probe.between(19.0, 20.0) == 100.0
    probe._slices = [(10.0, 0.004, 0.005)]  # timer granularity: wall a hair under cpu
    assert probe.between(0.0, 30.0) == 1.0
    assert probe.between(50.0, 60.0) == 1.0  # no slice in the window: no stretch


def test_a_thread_competing_for_the_cpu_stretches_the_probe() -> None:
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    with Slowdown() as probe:
        start = time.monotonic()
        competitor = threading.Thread(target=spin)
        competitor.start()
        try:
            deadline = time.monotonic() + 30
            while len(probe._slices) < 20 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            stop.set()
            competitor.join()
        end = time.monotonic()
    assert len(probe._slices) >= 20
    # The competitor holds the GIL for its switch interval whenever the probe wants
    # it: the probe's CPU slices take at least about twice their CPU time in wall time.
    assert probe.between(start, end) > 1.3
