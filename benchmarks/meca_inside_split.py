"""How well can MeCa's own signals separate the poison from the clean samples inside the class
the label-aware rule picked?

With the right class picked, what is left of a backdoor comes from the poison that the split
inside the class keeps (Otsu's split of the enhanced model's ``logit(p_e)``). For each finished
MeCa run given, this reads, inside the class detection picked (or, where it picked none, the
class most poison ids carry), four per-sample signals the defense has:

- ``enhanced``: the enhanced model's ``logit(p_e(y|x))`` (what the split uses);
- ``warm-up``: the warm-up model's margin (logit of the label minus the largest other logit),
  from ``meca_scores.pt`` where the run saved it, else by rerunning ``meca_warmup_model.pt``;
- ``consistency, first`` / ``consistency, last``: the adv-KL consistency score of the first
  and the last enhancement iteration;

and prints per signal the AUROC of the poison against the class's clean samples, what Otsu's
split of the signal flags (count, recall, precision), and the precision of the smallest
top-scored set that holds 95% of the class's poison (the best precision any threshold on that
signal can reach at recall >= 95%). A fifth row, ``warm-up features, 2-means``, is the split
``inside = "clusters"`` makes: 2-means on the warm-up model's PCA-reduced penultimate features of
the class, the cluster with the higher mean enhanced ``logit(p_e)`` flagged (recall and
precision only: it is a split, not a score); ``2-means, median decision`` is the same two
clusters decided by the higher *median* instead; ``2-means, core of the flagged cluster`` is
the part of the flagged cluster that ``clean_unlearn_core`` unlearns (the cluster split once more
by 2-means, the half with the higher mean ``logit(p_e)``). Runs without enhancement iterations (``iterations =
0``: the enhanced model is the warm-up model) have no consistency rows. Ground truth
(``poison.json``) is read only to score the signals; nothing here changes a run.

    python benchmarks/meca_inside_split.py "benchmarks/results/sweeps/meca-heldout/runs/seed=1,attack=blend-t5,defense=meca-spread" \\
        --out benchmarks/results/meca_inside_split.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import meca_detect_record, print_table, write_json  # noqa: E402

RECALL = 0.95


def precision_at_recall(score, truth, recall: float = RECALL) -> float | None:
    """Precision of the smallest set of top-scored samples that holds ``recall`` of the positives
    (ties broken by order: the figure is what the best threshold on ``score`` can reach)."""
    import math

    import torch

    pos = int(truth.sum())
    if pos == 0:
        return None
    order = torch.argsort(score.double(), descending=True, stable=True)
    hits = torch.cumsum(truth[order].to(torch.int64), 0)
    need = math.ceil(recall * pos)
    k = int(torch.nonzero(hits >= need)[0]) + 1
    return need / k


def read_run(d: Path) -> dict:
    import torch

    from bdframe.detection import auroc, flag_metrics
    from bdframe.interfaces import ScoreContext
    from bdframe.runs import read_json
    from bdframe.scan import load_run
    from bdframe.scoring import features, logits
    from bdframe_defense_meca.plugin import cluster_cores, cluster_split, confidence_scores, margins, otsu_threshold

    scores = torch.load(d / "meca_scores.pt", weights_only=False)
    parts, _ = load_run(d, device="cpu")
    ids = scores["ids"]
    pos = parts.poisoned.positions(ids)
    labels = parts.poisoned.labels[pos]
    truth = torch.isin(ids, torch.as_tensor(parts.poison_ids, dtype=torch.int64))
    rec = meca_detect_record(d)
    picked = None if rec is None else rec.get("suspicious_classes") or []
    if not bool(truth.any()):
        raise SystemExit(f"{d}: the run has no poisoned samples: nothing to separate")
    cls = picked[0] if picked else int(torch.mode(labels[truth]).values)
    inside = labels == cls
    warm = parts.build_model()
    warm.load_state_dict(torch.load(d / "meca_warmup_model.pt", map_location="cpu", weights_only=True))
    sctx = ScoreContext(progress=False)
    margin = scores.get("warmup_margin")
    if margin is None:
        margin = margins(logits(warm, parts.poisoned.subset(pos), sctx), labels)
    signals = {"enhanced": confidence_scores(scores["enhanced_prob"]), "warm-up": margin.double()}
    if scores["consistency_scores"]:
        signals.update({"consistency, first": scores["consistency_scores"][0].double(),
                        "consistency, last": scores["consistency_scores"][-1].double()})
    t = truth[inside]
    seed = int(read_json(d / "run.json")["seeds"]["run"])
    feats = features(warm, parts.poisoned.subset(pos[inside]), sctx).double()
    z = signals["enhanced"][inside]
    clusters = cluster_split(feats, z, ids[inside], ("meca-clusters", seed))
    metrics = read_json(d / "metrics.json")
    row = {"run": d.parent.parent.name + "/" + d.name, "attack": metrics.get("attack"),
           "class": parts.poisoned.classes[cls], "picked": bool(picked), "class_size": int(inside.sum()),
           "poison_in_class": int(t.sum()), "poison": int(truth.sum()), "signals": {}}
    for name, v in signals.items():
        v = v[inside]
        cut = otsu_threshold(v)
        split = flag_metrics(v > cut if cut is not None else torch.zeros_like(t), t)
        row["signals"][name] = {"auroc": auroc(v, t), "otsu_flagged": split["flagged"],
                                "otsu_recall": split["recall"],
                                "otsu_precision": split["precision"] if split["flagged"] else None,
                                "precision_at_95_recall": precision_at_recall(v, t)}
    # the same two clusters decided by the median logit(p_e) instead of the mean
    by_median = clusters
    if bool(clusters.any()) and not bool(clusters.all()):
        by_median = clusters if float(z[clusters].median()) > float(z[~clusters].median()) else ~clusters
    # clean_unlearn_core: the flagged cluster split once more, its more confidently fitted half
    core = cluster_cores(feats, scores["enhanced_prob"][inside], labels[inside], ids[inside], clusters, [cls],
                         seed=seed)
    for name, flags in (("warm-up features, 2-means", clusters), ("2-means, median decision", by_median),
                        ("2-means, core of the flagged cluster", core)):
        split = flag_metrics(flags, t)
        row["signals"][name] = {
            "auroc": None, "otsu_flagged": split["flagged"], "otsu_recall": split["recall"],
            "otsu_precision": split["precision"] if split["flagged"] else None, "precision_at_95_recall": None}
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", nargs="+", help="finished MeCa run directories of attacked rows")
    ap.add_argument("--out", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    dirs = [Path(d) for d in args.run_dir]
    bad = [str(d) for d in dirs if not (d / "meca_scores.pt").is_file() or not (d / "poison.json").is_file()]
    if bad:
        print(f"meca_inside_split.py: not a finished MeCa run of an attacked row (meca_scores.pt and poison.json "
              f"needed): {', '.join(bad)}", file=sys.stderr)
        return 2
    rows = [read_run(d) for d in dirs]
    flat = []
    for r in rows:
        for name, s in r["signals"].items():
            flat.append({"run": r["run"].split("/", 1)[1], "class": r["class"] + ("" if r["picked"] else " (not picked)"),
                         "in_class": f"{r['poison_in_class']}/{r['poison']}", "signal": name,
                         "auroc": s["auroc"], "otsu": f"{s['otsu_flagged']}",
                         "otsu_recall": None if s["otsu_recall"] is None else 100 * s["otsu_recall"],
                         "otsu_precision": None if s["otsu_precision"] is None else 100 * s["otsu_precision"],
                         "p95": None if s["precision_at_95_recall"] is None else 100 * s["precision_at_95_recall"]})
    print_table(flat, [("run", "run", "{}"), ("class", "class", "{}"), ("in_class", "poison in class", "{}"),
                       ("signal", "signal", "{}"), ("auroc", "AUROC in class", "{:.3f}"),
                       ("otsu", "split flags", "{}"), ("otsu_recall", "recall %", "{:.1f}"),
                       ("otsu_precision", "precision %", "{:.1f}"),
                       ("p95", "precision % at 95% recall", "{:.1f}")])
    if args.out:
        write_json(Path(args.out), {"recall_for_precision": RECALL, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
