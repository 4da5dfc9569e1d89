"""BadNet at 5% on real CIFAR-10, CPU-sized (issue: the foundation).

Trains the same configuration twice, without attack and with BadNet (white 3x3 patch,
target 1), on a class-balanced subset of the CIFAR-10 training images (default 20,000), and
evaluates on the full 10,000-image test set. Prints clean ACC, ASR, training throughput and
the share of training time spent outside the model's forward/backward/optimizer step.

The two rows are the "none" and "badnet" rows of ``attacks_cifar10.py`` and share its JSON
(benchmarks/results/attacks_cifar10.json): rows already computed with the same configuration
are reused unless ``--recompute`` is given.

    python benchmarks/badnet_cifar10.py             # about 15 minutes on 2 CPU cores
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attacks_cifar10  # noqa: E402
from _common import print_table  # noqa: E402


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rows = attacks_cifar10.main(argv + ["--only", "none", "badnet"])
    table = [dict(rows[k], setting={"none": "no attack", "badnet": "badnet 5%"}[k]) for k in ("none", "badnet")]
    print("\nBadNet (foundation benchmark): training throughput and data-path overhead")
    print_table(table, [("setting", "setting", "{}"), ("clean_acc", "clean ACC %", "{:.2f}"), ("asr", "ASR %", "{:.2f}"),
                        ("images_per_s", "train img/s", "{:.0f}"),
                        ("non_compute_pct", "time outside fwd/bwd/step %", "{:.1f}"), ("wall_s", "wall s", "{:.0f}")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
