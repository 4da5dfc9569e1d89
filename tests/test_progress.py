"""The progress line: counts, rate (or seconds per unit for slow units), elapsed time and ETA."""

import io
import time

from bdframe.progress import Progress


def line(n, total, elapsed, unit):
    p = Progress(total, "work", unit=unit, enabled=True, stream=io.StringIO())
    p.start -= elapsed
    p.n = n
    return p._line(time.perf_counter())


def test_fast_units_show_a_rate_and_slow_units_seconds_per_unit():
    fast = line(500, 1000, 2.0, "img")
    assert "500/1000  50.0%" in fast and "250 img/s" in fast and "eta 00:02" in fast
    slow = line(2, 10, 25.0, "epoch")
    assert "12.5 s/epoch" in slow and "eta 01:40" in slow and "epoch/s" not in slow
    assert "0 epoch/s" in line(0, 10, 3.0, "epoch")  # nothing done yet: no rate to invert
