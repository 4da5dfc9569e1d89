"""A small progress bar with rate and ETA, written to stderr.

On a terminal it redraws one line; otherwise (CI, logs) it prints a line at most every
``interval`` seconds and one at the end. ``BDFRAME_PROGRESS=0`` turns it off.
"""

from __future__ import annotations

import os
import sys
import time


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


def enabled_by_default() -> bool:
    return os.environ.get("BDFRAME_PROGRESS", "1") not in ("0", "false", "no")


class Progress:
    """``with Progress(total, "epoch 1/10", unit="img") as p: p.update(n, loss=0.1)``."""

    def __init__(self, total: int, desc: str = "", unit: str = "it", *, enabled: bool | None = None,
                 interval: float = 10.0, stream=None):
        self.total = max(int(total), 0)
        self.desc = desc
        self.unit = unit
        self.n = 0
        self.postfix: dict[str, object] = {}
        self.stream = stream or sys.stderr
        self.enabled = enabled_by_default() if enabled is None else enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.2 if self.tty else interval
        self.start = time.perf_counter()
        self._last = 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n: int = 1, **postfix: object) -> None:
        self.n += n
        if postfix:
            self.postfix.update(postfix)
        now = time.perf_counter()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            self._draw(now)

    def _line(self, now: float) -> str:
        el = now - self.start
        rate = self.n / el if el > 0 else 0.0
        pct = 100.0 * self.n / self.total if self.total else 100.0
        eta = (self.total - self.n) / rate if rate > 0 else 0.0
        width = 24
        filled = int(width * min(pct, 100.0) / 100)
        bar = "#" * filled + "." * (width - filled)
        post = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in self.postfix.items())
        # slow units (an epoch of trigger inversion) read better as seconds per unit
        speed = f"{rate:,.0f} {self.unit}/s" if rate >= 1 or rate == 0 else f"{1 / rate:,.1f} s/{self.unit}"
        return (f"{self.desc} [{bar}] {self.n}/{self.total} {pct:5.1f}% "
                f"{speed} elapsed {_fmt_time(el)} eta {_fmt_time(eta)} {post}").rstrip()

    def _draw(self, now: float) -> None:
        line = self._line(now)
        if self.tty:
            self.stream.write("\r" + line[:200].ljust(120))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()
        self.enabled = False
