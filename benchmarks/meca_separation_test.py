"""The gap class test and the gap-separation class test side by side on finished MeCa runs.

Both tests split each class's warm-up features in two (2-means on the PCA-reduced penultimate
features, the split ``inside = "clusters"`` makes of a picked class) and compare the classes by
robust z-scores:

- ``gap`` (``class_stat = "gap"``): how far apart the two groups' mean warm-up margins lie;
- ``separation``: how far apart the two groups lie in feature space for their spread (Fisher's
  criterion along the line through the two group means; one blob cut in two gives about 7);
- ``gap-separation`` (``class_stat = "gap-separation"``) picks by the larger of the two.

For each run directory given (a MeCa run that saved its warm-up model, ``meca_warmup_model.pt``)
this prints the class each test picks (at most one, ``spread_max_classes = 1``, above ``--k``),
the poisoned class's two z-scores beside the largest of the other classes', and, inside the
class gap-separation picks, what the defense would flag (the 2-means group with the higher mean
enhanced ``logit(p_e)``) and what ``clean_unlearn_core`` would unlearn (that group split once
more; its core by either ``core_side``: ``confident``, the half fitted more confidently, and
``far``, the half lying farther from the rest of the class): count, recall and precision against
the run's poison; and whether the warm-up model's confidence, in place of the enhanced model's,
chooses the same group and the same core (what ``iterations = 0`` does). The poisoned class (the label most
poison ids carry) and the poison ids are read only to label and score the rows; the tests never
see them.

    R=benchmarks/results/sweeps/meca-cifar10-50k/runs
    python benchmarks/meca_separation_test.py $R/attack=*,defense=meca-gap-core-k5 \\
        --out benchmarks/results/meca_separation_test_50k.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402
from meca_class_test import warmup_fit  # noqa: E402


def read_run(d: Path, k: float) -> dict:
    import torch

    from bdframe.detection import flag_metrics
    from bdframe.interfaces import ScoreContext
    from bdframe.runs import read_json
    from bdframe.scan import load_run
    from bdframe.scoring import features
    from bdframe_defense_meca.plugin import classes_above, cluster_cores, cluster_split, confidence_scores, \
        gap_separation_z

    scores = torch.load(d / "meca_scores.pt", weights_only=False)
    parts, _ = load_run(d, device="cpu")
    warm_prob, margin, labels = warmup_fit(d, scores, parts)
    ids = scores["ids"]
    names = parts.poisoned.classes
    truth = torch.isin(ids, torch.as_tensor(parts.poison_ids, dtype=torch.int64))
    target = int(torch.mode(labels[truth]).values) if bool(truth.any()) else None
    warm = parts.build_model()
    warm.load_state_dict(torch.load(d / "meca_warmup_model.pt", map_location="cpu", weights_only=True))
    feats = features(warm, parts.poisoned.subset(parts.poisoned.positions(ids)), ScoreContext(progress=False))
    feats = feats.double()
    seed = int(read_json(d / "run.json")["seeds"]["run"])
    key = ("meca-clusters", seed)
    present, z, both = gap_separation_z(feats, margin, labels, ids, key)
    row = {"run": d.parent.parent.name + "/" + d.name, "attack": json.loads((d / "metrics.json").read_text()).get(
        "attack"), "target": None if target is None else names[target], "poisoned": int(truth.sum()),
        "gap_pick": [names[c] for c in classes_above(present, both["gap"], k=k, limit=1)],
        "gap_separation_pick": [names[c] for c in classes_above(present, z, k=k, limit=1)]}
    for name, v in both.items():
        zc = {} if v is None else {int(c): float(x) for c, x in zip(present, v)}
        row[f"{name}_z"] = {names[c]: x for c, x in zc.items()}
        row[f"target_{name}_z"] = None if target is None else zc.get(target)
        others = [x for c, x in zc.items() if c != target]
        row[f"top_other_{name}_z"] = max(others) if others else None
    picked = classes_above(present, z, k=k, limit=1)
    if picked and bool(truth.any()):
        rows = labels == picked[0]
        flags = cluster_split(feats[rows], confidence_scores(scores["enhanced_prob"][rows]), ids[rows], key)
        cores = {side: cluster_cores(feats[rows], scores["enhanced_prob"][rows], labels[rows], ids[rows], flags,
                                     picked, seed=seed, side=side) for side in ("confident", "far")}
        # the same split with the warm-up model's confidence choosing the sides (iterations = 0)
        flags_w = cluster_split(feats[rows], confidence_scores(warm_prob[rows]), ids[rows], key)
        core_w = cluster_cores(feats[rows], warm_prob[rows], labels[rows], ids[rows], flags_w, picked, seed=seed)
        row["warmup_sides_same"] = bool(torch.equal(flags_w, flags) and torch.equal(core_w, cores["confident"]))
        for name, f in (("flagged", flags), ("core", cores["confident"]), ("core_far", cores["far"])):
            m = flag_metrics(f, truth[rows])
            # recall against all of the run's poison, not only the picked class's
            row[name] = {"count": m["flagged"], "recall": m["true_positives"] / int(truth.sum()),
                         "precision": m["precision"] if m["flagged"] else None}
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", nargs="+", help="finished MeCa run directories that saved their warm-up model")
    ap.add_argument("--k", type=float, default=2.0, help="the robust z cut of both tests (spread_k, default 2.0)")
    ap.add_argument("--out", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    if not args.k > 0:
        print("meca_separation_test.py: --k must be above 0", file=sys.stderr)
        return 2
    dirs = [Path(d) for d in args.run_dir]
    bad = [str(d) for d in dirs if not (d / "meca_scores.pt").is_file() or not (d / "meca_warmup_model.pt").is_file()]
    if bad:
        print(f"meca_separation_test.py: not a finished MeCa run with its warm-up model (meca_scores.pt and "
              f"meca_warmup_model.pt needed): {', '.join(bad)}", file=sys.stderr)
        return 2
    rows = [read_run(d, args.k) for d in dirs]
    for r in rows:
        r["gap_pick_s"] = ", ".join(r["gap_pick"]) or "none"
        r["gap_separation_pick_s"] = ", ".join(r["gap_separation_pick"]) or "none"
        r["warmup_sides_same_s"] = {True: "yes", False: "no"}.get(r.get("warmup_sides_same"), "-")
        for name in ("flagged", "core", "core_far"):
            m = r.get(name)
            r[f"{name}_s"] = "-" if m is None else (
                f"{m['count']} ({100 * m['recall']:.1f} / "
                f"{'-' if m['precision'] is None else format(100 * m['precision'], '.1f')})")
    print_table(rows, [("run", "run", "{}"), ("target", "poisoned class", "{}"),
                       ("gap_pick_s", "gap picks", "{}"), ("gap_separation_pick_s", "gap-separation picks", "{}"),
                       ("target_gap_z", "gap z poisoned", "{:.2f}"), ("top_other_gap_z", "gap z other max", "{:.2f}"),
                       ("target_separation_z", "sep. z poisoned", "{:.2f}"),
                       ("top_other_separation_z", "sep. z other max", "{:.2f}"),
                       ("flagged_s", "flagged (recall / precision %)", "{}"),
                       ("core_s", "core, confident (recall / precision %)", "{}"),
                       ("core_far_s", "core, far (recall / precision %)", "{}"),
                       ("warmup_sides_same_s", "same with the warm-up's fit", "{}")])
    if args.out:
        write_json(Path(args.out), {"k": args.k, "rows": [{k: v for k, v in r.items() if not k.endswith("_s")}
                                                          for r in rows]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
