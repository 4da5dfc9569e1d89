"""Which of a class's two feature groups is the poison: three side rules measured on finished runs.

MeCa's ``inside = "clusters"`` splits a picked class in two (2-means on the PCA-reduced
penultimate features of the model trained on the poisoned data) and flags one of the two
groups. Which one is the side rule:

- ``confident`` (what ``cluster_split`` does): the group the model fits more confidently
  (higher mean ``logit(p(y|x))``); a dirty-label trigger is easier to learn than the class;
- ``runner-up``: the group whose runner-up classes are more varied (higher entropy of the
  histogram of each sample's most likely class other than its label). A dirty-label poison
  group is images of every other class, so what the model would call them without the trigger
  varies; a clean group's runner-up is the few classes that resemble it;
- ``auto`` (MeCa's ``split_side = "auto"``): runner-up where the two groups' entropies differ
  by more than ``--cut`` nats, else confident.

Beside each group's confidence and runner-up entropy, the share of it the model calls by a class
other than the label (another class strictly more likely): a clean group of a class is mostly called by its label, while
relabelled images the model has not learned the trigger for are called by the class they were
drawn from.

Beside the sides, how much of the poison the group ``auto`` flags holds (recall and precision
against all poisoned samples), and the same after one kNN step: each unflagged sample of the
class whose ``--knn`` nearest samples of the class (in the PCA-reduced features the split was
drawn in) are mostly flagged is flagged too. 2-means cuts the class with a straight boundary;
the step asks whether the poison it leaves out lies in the flagged group's neighbourhood.

For each run directory given, the model is the run's saved warm-up model
(``meca_warmup_model.pt``) or else its final model (``model.pt``: a no-defense run's model is
trained on the same poisoned data). The class looked at is the poisoned class (the label most
poison ids carry), also where the class test would pick another: the point is the side, not
the pick. Ground truth is read only to choose that class and to score the groups.

    R=benchmarks/results/sweeps/meca-cifar10-50k/runs
    python benchmarks/meca_side_rules.py $R/attack=*,defense=meca-gap-core-k5 \\
        --out benchmarks/results/meca_side_rules_50k.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402


def read_run(d: Path, cut: float, knn: int) -> dict | None:
    import torch

    from bdframe.interfaces import ScoreContext
    from bdframe.runs import read_json
    from bdframe.scan import load_run
    from bdframe.scoring import features, logits
    from bdframe_defense_meca.plugin import (_cluster_means, _neighbours_inside, _two_clusters,
                                             called_by_another_class, confidence_scores, runner_up_entropy, split_side)

    model_file = "meca_warmup_model.pt" if (d / "meca_warmup_model.pt").is_file() else "model.pt"
    parts, _ = load_run(d, device="cpu")
    data = parts.poisoned
    model = parts.build_model()
    model.load_state_dict(torch.load(d / model_file, map_location="cpu", weights_only=True))
    ctx = ScoreContext(progress=False)
    prob = torch.softmax(logits(model, data, ctx).double(), 1)
    feats = features(model, data, ctx).double()
    labels = torch.as_tensor(data.labels, dtype=torch.int64)
    ids = torch.as_tensor(data.ids, dtype=torch.int64)
    truth = torch.isin(ids, torch.as_tensor(parts.poison_ids, dtype=torch.int64))
    if not bool(truth.any()):
        return None
    target = int(torch.mode(labels[truth]).values)
    rows = torch.nonzero(labels == target).flatten()
    seed = int(read_json(d / "run.json")["seeds"]["run"])
    assign, z = _two_clusters(feats[rows], ids[rows], ("meca-clusters", seed), 10, with_points=True)
    metrics = json.loads((d / "metrics.json").read_text())
    row = {"run": d.parent.parent.name + "/" + d.name, "model": model_file, "attack": metrics.get("attack"),
           "target": data.classes[target], "poisoned": int(truth.sum())}
    if assign is None:
        return row
    signal = confidence_scores(prob[rows, target])
    conf = _cluster_means(signal, assign)
    ent = [runner_up_entropy(prob[rows][assign == k], target) for k in (0, 1)]
    moved = called_by_another_class(prob[rows], target)  # what split_side = "auto-moved" reads
    moved_share = [float(moved[assign == k].double().mean()) for k in (0, 1)]
    poison = [int(truth[rows][assign == k].sum()) for k in (0, 1)]
    size = [int((assign == k).sum()) for k in (0, 1)]
    p = 0 if poison[0] / size[0] > poison[1] / size[1] else 1  # the group holding the larger poison share
    row["groups"] = [{"size": size[k], "poisoned": poison[k], "mean_logit_conf": conf[k], "runner_up_entropy": ent[k],
                      "moved_share": moved_share[k]}
                     for k in (0, 1)]
    row["poison_group"] = {"size": size[p], "poison_share": poison[p] / size[p], "recall": poison[p] / int(truth.sum())}
    row["confident_right"] = (0 if conf[0] > conf[1] else 1) == p
    row["runner_up_right"] = (0 if ent[0] > ent[1] else 1) == p
    side = split_side(assign, signal, prob[rows], target, side="auto", cut=cut)
    row["auto_right"] = side == p
    row["auto_uses"] = "runner-up" if abs(ent[0] - ent[1]) > cut else "confident"
    if side is not None:
        flagged = assign == side
        near = _neighbours_inside(z, flagged, torch.arange(len(rows)), ids[rows], k=knn)
        for key, f in (("auto_group", flagged), ("auto_knn", flagged | (near > 0.5))):
            hit = int((f & truth[rows]).sum())
            row[key] = {"size": int(f.sum()), "recall": hit / int(truth.sum()), "precision": hit / max(1, int(f.sum()))}
    row["poison_group_conf"], row["other_group_conf"] = conf[p], conf[1 - p]
    row["poison_group_entropy"], row["other_group_entropy"] = ent[p], ent[1 - p]
    row["poison_group_moved"], row["other_group_moved"] = moved_share[p], moved_share[1 - p]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", nargs="+", help="finished runs with meca_warmup_model.pt or model.pt")
    from bdframe_defense_meca.plugin import SPLIT_SIDE_CUT

    ap.add_argument("--cut", type=float, default=SPLIT_SIDE_CUT,
                    help=f"split_side = auto's cut (nats; default MeCa's, {SPLIT_SIDE_CUT})")
    ap.add_argument("--knn", type=int, default=20, help="neighbours of the kNN step (default 20)")
    ap.add_argument("--out", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.knn < 1:
        print(f"meca_side_rules.py: --knn must be at least 1, got {args.knn}", file=sys.stderr)
        return 2
    dirs = [Path(d) for d in args.run_dir]
    bad = [str(d) for d in dirs if not (d / "meca_warmup_model.pt").is_file() and not (d / "model.pt").is_file()]
    if bad:
        print(f"meca_side_rules.py: no meca_warmup_model.pt or model.pt in: {', '.join(bad)}", file=sys.stderr)
        return 2
    rows = [r for r in (read_run(d, args.cut, args.knn) for d in dirs) if r is not None]
    yes = {True: "yes", False: "no"}
    for r in rows:
        g = r.get("poison_group")
        r["poison_group_s"] = "-" if g is None else f"{g['size']} ({100 * g['poison_share']:.1f}% poisoned)"
        r["confident_s"] = yes.get(r.get("confident_right"), "-")
        r["runner_up_s"] = yes.get(r.get("runner_up_right"), "-")
        r["auto_s"] = "-" if g is None else f"{yes[r['auto_right']]} ({r['auto_uses']})"
        for key in ("auto_group", "auto_knn"):
            v = r.get(key)
            r[key + "_s"] = "-" if v is None else f"{v['size']} ({100 * v['recall']:.1f} / {100 * v['precision']:.1f})"
    print("The poisoned class split in two; which group each side rule flags (yes: the poison's group)")
    print_table(rows, [("run", "run", "{}"), ("target", "poisoned class", "{}"),
                       ("poison_group_s", "poison's group", "{}"),
                       ("poison_group_conf", "its mean logit p", "{:.2f}"), ("other_group_conf", "other's", "{:.2f}"),
                       ("confident_s", "confident right", "{}"),
                       ("poison_group_entropy", "its runner-up entropy", "{:.3f}"),
                       ("other_group_entropy", "other's", "{:.3f}"), ("runner_up_s", "runner-up right", "{}"),
                       ("auto_s", f"auto (cut {args.cut:g}) right", "{}"),
                       ("auto_group_s", "auto's group (recall / precision %)", "{}"),
                       ("auto_knn_s", f"with the {args.knn}-NN step", "{}"),
                       ("poison_group_moved", "its share called another class", "{:.3f}"),
                       ("other_group_moved", "other's", "{:.3f}")])
    if args.out:
        write_json(Path(args.out), {"rows": [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
