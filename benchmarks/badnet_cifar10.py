"""BadNet at 5% on real CIFAR-10, CPU-sized (issue: the foundation).

Trains the same configuration twice, without attack and with BadNet, on a class-balanced
subset of the CIFAR-10 training images (default 20,000), and evaluates on the full
10,000-image test set. Prints clean ACC, ASR, training throughput and the share of training
time spent outside the model's forward/backward/step, and writes JSON.

    python benchmarks/badnet_cifar10.py            # about 15 minutes on 2 CPU cores
    python benchmarks/badnet_cifar10.py --epochs 2 --train-size 5000   # a quick look
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, cifar10_tree, print_table, run_recipe, write_json  # noqa: E402


def cpu_recipe(root: Path, *, train_size: int, epochs: int, width: int, device: str, seed: int) -> dict:
    """The CPU-sized CIFAR-10 configuration other benchmarks reuse."""
    return {
        "seed": seed, "device": device,
        "dataset": {"name": "imagefolder", "root": str(root), "train_size": train_size},
        "model": {"name": "simple-cnn", "width": width},
        "train": {"name": "standard", "epochs": epochs, "batch_size": 128, "lr": 0.1, "momentum": 0.9,
                  "nesterov": True, "weight_decay": 5e-4, "schedule": "onecycle", "label_smoothing": 0.1},
        "defense": {"name": "none", "evaluate_each_epoch": False},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="CIFAR-10 image-folder tree or the cifar10-jpeg.tar.gz (default: ../shared)")
    ap.add_argument("--train-size", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--poison-rate", type=float, default=0.05)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "badnet_cifar10.json"))
    args = ap.parse_args(argv)

    root = cifar10_tree(args.data)
    base = cpu_recipe(root, train_size=args.train_size, epochs=args.epochs, width=args.width, device=args.device,
                      seed=args.seed)
    runs_dir = Path(args.out).with_suffix("").parent / "runs"
    rows = []
    for label, attack in (("no attack", None), ("badnet 5%", {"name": "badnet", "poison_rate": args.poison_rate,
                                                               "target": 1})):
        recipe = dict(base, name=f"badnet-bench-{'clean' if attack is None else 'badnet'}")
        if attack:
            recipe["attack"] = attack
        print(f"running {label} ...", file=sys.stderr, flush=True)
        m = run_recipe(recipe, runs_dir / recipe["name"], progress=True)
        rows.append({"setting": label, "clean_acc": 100 * m["clean_acc"],
                     "asr": 100 * m["asr"] if "asr" in m else None,
                     "images_per_s": m["train_images_per_s"], "non_compute_pct": 100 * m["train_non_compute_share"],
                     "wall_s": m["wall_seconds"], "train_size": m["train_size"], "test_size": m["test_size"],
                     "num_poison": m["num_poison"], "run_dir": m["run_dir"]})
    print(f"\nBadNet {100 * args.poison_rate:g}% on CIFAR-10 (train {args.train_size}, test 10,000), simple-cnn "
          f"width {args.width}, {args.epochs} epochs")
    print_table(rows, [("setting", "setting", "{}"), ("clean_acc", "clean ACC %", "{:.2f}"), ("asr", "ASR %", "{:.2f}"),
                       ("images_per_s", "train img/s", "{:.0f}"), ("non_compute_pct", "outside fwd/bwd %", "{:.1f}"),
                       ("wall_s", "wall s", "{:.0f}")])
    write_json(Path(args.out), {"benchmark": "badnet_cifar10", "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
