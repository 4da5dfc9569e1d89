"""How close Activation Clustering's per-class decision is to flipping, on finished runs.

The `activation-clustering` scorer splits each class's penultimate features (projected onto their
top principal directions) in two by 2-means and, with its default rule, flags the smaller cluster
when it holds less than `size_threshold` (0.35) of the class. This script recomputes that split for
each run directory given, from the model the run saved (`model.pt` by default; `--model NAME` for
another file in the run directory) and the run's poisoned training set, and prints per class the
smaller cluster's share of the class. The split is the scorer's own (its `decision = "smaller"`
marks the smaller cluster of every class), seeded as the `detect` defense seeds it. The poison ids
are read only to report how many poisoned samples each smaller cluster holds; the split never
sees them.

    python benchmarks/ac_cluster_shares.py benchmarks/results/sweeps/detect-retrain-cifar10/runs/*defense=none \\
        --out benchmarks/results/ac_cluster_shares.json

The table gives, per run: the smallest share among the classes that hold no poison (how near a
clean class came to being flagged), the share of the class holding the poison, and how many of
its poisoned samples the smaller cluster holds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402


def read_run(d: Path, model_name: str, threshold: float) -> dict:
    import torch

    from bdframe.interfaces import ScoreContext
    from bdframe.scan import load_run
    from bdframe.scoring import features
    from bdframe.seeding import derive_seed

    parts, _ = load_run(d, device="cpu")
    model = parts.build_model()
    model.load_state_dict(torch.load(d / model_name, map_location="cpu", weights_only=True))
    data = parts.poisoned
    feats = features(model, data, ScoreContext(progress=False)).double()
    # the scorer's split with every class's smaller cluster marked, seeded as in a detect run
    scorer = parts.registry.create("scorer", "activation-clustering", decision="smaller")
    seed = derive_seed(parts.recipe.seed, "detect", "activation-clustering")
    _, small = scorer.scores_from_features(feats, data.labels, data.ids, seed)
    truth = torch.isin(data.ids, torch.as_tensor(parts.poison_ids, dtype=torch.int64))
    classes = []
    for c in torch.unique(data.labels).tolist():
        rows = data.labels == c
        # the scorer marks neither half of a split into two equal clusters (a share of one half)
        share = float(small[rows].double().mean()) if bool(small[rows].any()) else 0.5
        classes.append({"class": parts.poisoned.classes[c], "size": int(rows.sum()), "small_share": share,
                        "poisoned": int(truth[rows].sum()), "poisoned_in_small": int((small & truth)[rows].sum())})
    clean = [k for k in classes if k["poisoned"] == 0]
    hit = max(classes, key=lambda k: k["poisoned"])
    return {"run": d.name, "poisoned": int(truth.sum()),
            "min_clean_share": min(k["small_share"] for k in clean) if clean else None,
            "clean_below": sum(k["small_share"] < threshold for k in clean),
            "poisoned_class": hit["class"] if hit["poisoned"] else None,
            "poisoned_share": hit["small_share"] if hit["poisoned"] else None,
            "poisoned_in_small": hit["poisoned_in_small"] if hit["poisoned"] else None,
            "classes": classes}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", nargs="+", help="finished run directories that saved a model")
    ap.add_argument("--model", default="model.pt", help="the model file in each run directory (default model.pt)")
    ap.add_argument("--threshold", type=float, default=0.35, help="the relative-size rule's share (default 0.35)")
    ap.add_argument("--out", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    if not 0 < args.threshold < 0.5:
        print("ac_cluster_shares.py: --threshold must lie in (0, 0.5)", file=sys.stderr)
        return 2
    dirs = [Path(d) for d in args.run_dir]
    bad = [str(d) for d in dirs if not (d / args.model).is_file() or not (d / "run.json").is_file()]
    if bad:
        print(f"ac_cluster_shares.py: not a finished run with {args.model}: {', '.join(bad)}", file=sys.stderr)
        return 2
    rows = [read_run(d, args.model, args.threshold) for d in dirs]
    for r in rows:
        r["hit"] = None if r["poisoned_in_small"] is None else f"{r['poisoned_in_small']} of {r['poisoned']}"
    print_table(rows, [("run", "run", "{}"), ("min_clean_share", "smallest share, clean classes", "{:.3f}"),
                       ("clean_below", f"clean classes below {args.threshold}", "{}"),
                       ("poisoned_class", "poisoned class", "{}"), ("poisoned_share", "its share", "{:.3f}"),
                       ("hit", "poisoned in its smaller cluster", "{}")])
    if args.out:
        write_json(Path(args.out), {"model": args.model, "threshold": args.threshold,
                                    "rows": [{k: v for k, v in r.items() if k != "hit"} for r in rows]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
