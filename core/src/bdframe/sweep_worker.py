"""One run of a sweep in its own process: ``python -m bdframe.sweep_worker LOCKFILE run RECIPE ...``.

It asks (on Linux) to be stopped when the sweep process that started it dies, takes the run's
lock (so no two processes run one run at once; the lock goes with the process, whatever ends
it) and then does what ``bdframe run`` does with the remaining arguments.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def _set_parent_death_signal() -> None:
    """On Linux, ask to receive SIGTERM when the sweep process dies (kill -9 included), so no run
    outlives the sweep that started it; the run's ``.partial`` directory is resumed next time."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover
        pass


def main(argv: list[str]) -> int:
    parent = os.getppid()
    _set_parent_death_signal()
    if os.getppid() != parent:  # the sweep died before the signal was armed
        return 143
    lock_path, rest = Path(argv[0]), argv[1:]
    try:
        import fcntl

        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print(f"bdframe: error: {lock_path.stem} is being run by another process", file=sys.stderr)
            return 75
    except ImportError:  # pragma: no cover - Windows: no lock
        pass
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from bdframe.cli import main as cli_main

    return cli_main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
