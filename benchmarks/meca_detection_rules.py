"""Every MeCa detection rule applied to one finished MeCa run's enhanced model (no retraining).

Reads ``meca_scores.pt`` (the enhanced model's ``p_e(y|x)`` and the paper rule's flags) and
``poison.json`` of a run directory and prints, per rule, the flagged share and detection recall
and precision against the poison ids, then per class (by the label each sample carries) the
share above the label-aware rule's confidence thresholds, and the warm-up model's share above 0.99
where the run saved it (``class_test`` other than ``"enhanced"``) (ground truth is read here only, to score the rules; the
rules themselves never see it). Clean ACC/ASR need a run with that rule (a ``detection``
setting of the MeCa sweep); this script shows what each rule would keep.
``--models`` also reruns the saved warm-up and enhanced models over the training set and prints
the detection AUROC of each model's ``p(y|x)`` overall and within the class most of the
poison carries, and each class's median ``logit p(y|x)`` under both models.

    python benchmarks/meca_detection_rules.py "benchmarks/results/sweeps/meca-cifar10/runs/attack=badnet,defense=meca"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402


def rules(scores: dict) -> dict:
    """rule name -> bool flags over ``scores["ids"]``."""
    from bdframe_defense_meca.plugin import flag_confident, flag_label_aware

    prob = scores["enhanced_prob"]
    return {"argmax (paper)": scores["paper_rule_poison"],
            "confidence, mad": flag_confident(prob, threshold="mad"),
            "confidence, otsu": flag_confident(prob, threshold="otsu"),
            "label-aware": flag_label_aware(prob, scores["labels"])[0],
            "label-aware, class_alpha 0.01": flag_label_aware(prob, scores["labels"], alpha=0.01)[0],
            "label-aware, confidence_high 0.999": flag_label_aware(prob, scores["labels"], high=0.999)[0],
            "label-aware, inside reference": flag_label_aware(prob, scores["labels"], inside="reference")[0],
            "label-aware, inside reference, class_alpha 0.01":
                flag_label_aware(prob, scores["labels"], inside="reference", alpha=0.01)[0]}


def compare_models(d: Path, parts, ids, labels, truth, classes) -> dict:
    """The warm-up and the enhanced model's ``p(y|x)`` as detection scores: AUROC overall and in
    the class most poison carries, and each class's median ``logit p(y|x)``."""
    import torch

    from bdframe.detection import auroc
    from bdframe.interfaces import ScoreContext
    from bdframe.scoring import logits

    data = parts.poisoned.subset(parts.poisoned.contains(ids))
    order = data.positions(ids)
    logit_p = {}
    for tag in ("warmup", "enhanced"):
        model = parts.build_model()
        model.load_state_dict(torch.load(d / f"meca_{tag}_model.pt", map_location="cpu", weights_only=True))
        z = logits(model, data, ScoreContext(progress=False))[order].double()
        logp = torch.log_softmax(z, 1).gather(1, labels[:, None])[:, 0]
        logit_p[tag] = logp - torch.log((-torch.expm1(logp)).clamp_min(1e-300))
    out = {"auroc": {}, "class_median_logit": {}}
    if bool(truth.any()):
        top = int(torch.mode(labels[truth]).values)
        inside = labels == top
        out["poison_class"] = classes[top]
        out["auroc"] = {tag: {"all": auroc(v, truth), "poison_class": auroc(v[inside], truth[inside])}
                        for tag, v in logit_p.items()}
        print()
        print_table([{"model": tag, **a} for tag, a in out["auroc"].items()],
                    [("model", "model", "{}"), ("all", "p(y|x) AUROC", "{:.3f}"),
                     ("poison_class", f"AUROC within {classes[top]}", "{:.3f}")])
    med = []
    for c, name in enumerate(classes):
        m = labels == c
        if bool(m.any()):
            med.append({"class": name, **{tag: float(v[m].median()) for tag, v in logit_p.items()}})
    out["class_median_logit"] = med
    print()
    print_table(med, [("class", "class (label)", "{}"), ("warmup", "median logit p, warm-up", "{:.2f}"),
                      ("enhanced", "median logit p, enhanced", "{:.2f}")])
    return out


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="a finished MeCa run directory")
    ap.add_argument("--out", help="also write the table as JSON here")
    ap.add_argument("--models", action="store_true",
                    help="also compare the warm-up and the enhanced model's p(y|x) (reruns both over the training set)")
    args = ap.parse_args(argv)
    d = Path(args.run_dir)
    s = torch.load(d / "meca_scores.pt", weights_only=False)
    if "paper_rule_poison" not in s:
        raise SystemExit(f"{d}/meca_scores.pt predates the saved paper-rule flags; rerun the MeCa row")
    from bdframe.scan import load_run

    parts, _ = load_run(d, device="cpu")
    labels = parts.poisoned.labels[parts.poisoned.positions(s["ids"])]
    truth = torch.isin(s["ids"], torch.as_tensor(json.loads((d / "poison.json").read_text()).get("poison_ids", []), dtype=torch.int64))
    rows = []
    for name, flags in rules({**s, "labels": labels}).items():
        flags = torch.as_tensor(flags, dtype=torch.bool)
        hit = int((flags & truth).sum())
        rows.append({"rule": name, "flagged": 100 * float(flags.double().mean()),
                     "recall": 100 * hit / int(truth.sum()) if bool(truth.any()) else None,
                     "precision": 100 * hit / int(flags.sum()) if int(flags.sum()) and bool(truth.any()) else None,
                     "kept": int((~flags).sum())})
    print_table(rows, [("rule", "rule", "{}"), ("flagged", "flagged %", "{:.1f}"), ("recall", "recall %", "{:.1f}"),
                       ("precision", "precision %", "{:.1f}"), ("kept", "kept", "{}")])
    # the label-aware rule's class statistic, computed by the rule's own class_shares: per class,
    # the share of samples above the confidence_high threshold (the poisoned count comes from the
    # ground truth, for reading only)
    from bdframe_defense_meca.plugin import class_shares

    shares = {"share_099": (s["enhanced_prob"], 0.99), "share_0999": (s["enhanced_prob"], 0.999)}
    warm = s.get("warmup_prob")  # saved by runs whose class_test reads the warm-up model
    if warm is not None:
        shares["warmup_share_099"] = (warm, 0.99)
    present, _ = class_shares(s["enhanced_prob"], labels)
    shares = {k: class_shares(p, labels, high=high)[1] for k, (p, high) in shares.items()}
    classes = parts.poisoned.classes
    per_class = [{"class": classes[c], "samples": int((labels == c).sum()), "poisoned": int(((labels == c) & truth).sum()),
                  **{k: 100 * float(v[i]) for k, v in shares.items()}}
                 for i, c in enumerate(present.tolist())]
    print()
    print_table(per_class, [("class", "class (label)", "{}"), ("samples", "samples", "{}"),
                            ("poisoned", "poisoned", "{}"), ("share_099", "p_e > 0.99 %", "{:.1f}"),
                            ("share_0999", "p_e > 0.999 %", "{:.1f}")]
                + ([("warmup_share_099", "p_w > 0.99 %", "{:.1f}")] if warm is not None else []))
    models = compare_models(d, parts, s["ids"], labels, truth, classes) if args.models else None
    if args.out:
        write_json(Path(args.out), {"run_dir": str(d), "rows": rows, "classes": per_class, "models": models})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
