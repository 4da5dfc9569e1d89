"""Poisoned-sample scorers on models trained on BadNet- and Blend-poisoned CIFAR-10 (issue: scorers).

Uses the run directories that ``attacks_cifar10.py`` leaves in benchmarks/results/runs/ (the
CPU-sized configuration: simple-cnn on 20,000 training images, 5% poison). For each run and
scorer it scores the whole poisoned training set and reports AUROC, TPR at 5% FPR (poison ids
are the positives, cover samples count as negatives), and scoring throughput beside the
training throughput of the same model, measured in this process on the same data.

    python benchmarks/attacks_cifar10.py --only badnet blend   # the two models (if not there yet)
    python benchmarks/scorers_cifar10.py                       # every registered scorer + adv-kl mask modes
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, add_results_args, print_table, read_json, write_json  # noqa: E402

RUNS = REPO / "benchmarks" / "results" / "runs"


# CPU-sized deviations from the scorers' defaults, stated in the table: STRIP's 100 overlays per
# image would cost 100 forward passes x 20,000 images; 16 keep it to a couple of minutes.
OVERRIDES = {"strip": {"n_overlays": 16}}


def variants(names: list[str]) -> list[tuple[str, str, dict]]:
    """(label, scorer name, params); adv-kl is measured in both mask modes and at smaller epsilons."""
    out = []
    for n in names:
        if n == "adv-kl":
            out += [("adv-kl (grid)", n, {"mask_mode": "grid"}), ("adv-kl (single)", n, {"mask_mode": "single"})]
            out += [(f"adv-kl (grid, eps {e}/255)", n, {"mask_mode": "grid", "epsilon": e / 255}) for e in (2, 4)]
        elif n in OVERRIDES:
            out.append((n + " " + ",".join(f"{k}={v}" for k, v in OVERRIDES[n].items()), n, OVERRIDES[n]))
        else:
            out.append((n, n, {}))
    return out


def train_throughput(model, data, device, batches: int = 40) -> float:
    """Images/s of the standard training step on a copy of the model (same data, same device)."""
    import torch

    from bdframe.interfaces import StageContext
    from bdframe.training import OptimSettings, fit_cross_entropy

    m = copy.deepcopy(model)
    sub = data.subset(torch.arange(min(len(data), 128 * batches)))
    hist = fit_cross_entropy(m, sub, StageContext(seed=0, device=device, name="throughput", progress=False),
                             OptimSettings(epochs=1, lr=0.01))
    return hist[0]["images_per_s"]


def main(argv=None) -> int:
    from bdframe import detection
    from bdframe.interfaces import ScoreContext
    from bdframe.nn import resolve_device
    from bdframe.scan import load_run

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=[str(RUNS / "attack-bench-badnet"), str(RUNS / "attack-bench-blend")])
    ap.add_argument("--scorers", nargs="+", help="scorer names (default: every registered scorer)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    add_results_args(ap, "scorers_cifar10.json")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    out = Path(args.out)
    saved = read_json(out, {"rows": {}})
    rows = saved["rows"]
    for run in args.runs:
        run_dir = Path(run)
        if not (run_dir / "model.pt").is_file():
            raise SystemExit(f"{run_dir} is not a finished run; run benchmarks/attacks_cifar10.py first")
        parts, model = load_run(run_dir, device=device)
        recipe, registry, train, poison_ids = parts.recipe, parts.registry, parts.poisoned, parts.poison_ids
        truth = train.contains(poison_ids)
        names = args.scorers or registry.names("scorer")
        train_ips = None
        for label, name, params in variants(names):
            key = f"{run_dir.name}|{label}"
            if key in rows and not args.recompute:
                continue
            if train_ips is None:
                train_ips = train_throughput(model, train, device)
            scorer = registry.create("scorer", name, **params)
            ctx = ScoreContext(seed=args.seed, device=device, batch_size=args.batch_size, progress=True)
            print(f"{run_dir.name}: {label} ...", file=sys.stderr, flush=True)
            t = time.perf_counter()
            scores = scorer.score(model, train, ctx)
            secs = time.perf_counter() - t
            flagged = scorer.flag(scores, train) if hasattr(scorer, "flag") else None
            summ = detection.summary(scores, truth, flagged=flagged)
            rows[key] = {"run": run_dir.name, "attack": recipe.attack.name, "scorer": label, "auroc": summ["auroc"],
                         "tpr_at_5pct_fpr": summ["tpr_at_fpr"]["0.05"],
                         "tpr_at_fpr": summ["tpr_at_fpr"], "split": summ.get("split"), "seconds": secs,
                         "images_per_s": len(train) / secs, "train_images_per_s": train_ips,
                         "ratio_to_training": (len(train) / secs) / train_ips, "n": len(train),
                         "params": params}
            write_json(out, {"benchmark": "scorers_cifar10", "rows": rows})
    table = sorted(rows.values(), key=lambda r: (r["attack"], r["scorer"]))
    print("\nScorers on the poisoned CIFAR-10 training set (20,000 images, 5% poison), simple-cnn")
    print_table(table, [("attack", "attack", "{}"), ("scorer", "scorer", "{}"), ("auroc", "AUROC", "{:.3f}"),
                        ("tpr_at_5pct_fpr", "TPR@5%FPR", "{:.3f}"), ("images_per_s", "score img/s", "{:.0f}"),
                        ("train_images_per_s", "train img/s", "{:.0f}"), ("ratio_to_training", "ratio", "{:.2f}")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
