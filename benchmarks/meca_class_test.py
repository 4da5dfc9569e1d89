"""MeCa's two class tests side by side on the warm-up models of finished MeCa runs.

The label-aware rule flags samples only inside the classes a class test picks. This script
reads, for each run directory given (a MeCa run that saved its warm-up model), what each test
picks from that run's warm-up model:

- ``share`` (``class_stat = "share"``): a class whose share of samples fitted with
  ``p(y|x) > 0.99`` is a Grubbs outlier among the classes;
- ``spread`` (``class_stat = "spread"``): a class whose spread (the ``--q`` quantile of its
  samples' margins minus their median) lies more than ``--k`` robust standard deviations above
  the median spread.

The warm-up model's margins come from ``meca_scores.pt`` where the run saved them (runs with
``class_stat = "spread"``), else the saved warm-up model (``meca_warmup_model.pt``) is rerun over
the training set. The poisoned class (the label most poison ids carry) and the warm-up model's
ASR are read only to label the rows; the tests never see them.

    python benchmarks/meca_class_test.py benchmarks/results/sweeps/meca-cifar10/runs/*defense=meca-unlearn-warmup \\
        --out benchmarks/results/meca_class_test.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402


def warmup_fit(d: Path, scores: dict, parts):
    """The warm-up model's ``(p(y|x), margin)`` over the run's training set, in ``scores["ids"]`` order."""
    import torch

    from bdframe.interfaces import ScoreContext
    from bdframe.scoring import logits
    from bdframe_defense_meca.plugin import detect, margins

    labels = parts.poisoned.labels[parts.poisoned.positions(scores["ids"])]
    if scores.get("warmup_margin") is not None and scores.get("warmup_prob") is not None:
        return scores["warmup_prob"], scores["warmup_margin"], labels
    path = d / "meca_warmup_model.pt"
    if not path.is_file():
        raise SystemExit(f"{d}: neither saved warm-up margins nor meca_warmup_model.pt (run MeCa with save_models)")
    model = parts.build_model()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    data = parts.poisoned.subset(parts.poisoned.positions(scores["ids"]))
    z = logits(model, data, ScoreContext(progress=False))
    return detect(z, labels)[1], margins(z, labels), labels


def read_run(d: Path, q: float, k: float) -> dict:
    import torch

    from bdframe.scan import load_run
    from bdframe_defense_meca.plugin import classes_above, spread_z, suspicious_classes

    scores = torch.load(d / "meca_scores.pt", weights_only=False)
    parts, _ = load_run(d, device="cpu")
    prob, margin, labels = warmup_fit(d, scores, parts)
    names = parts.poisoned.classes
    truth = torch.isin(scores["ids"], torch.as_tensor(parts.poison_ids, dtype=torch.int64))
    target = int(torch.mode(labels[truth]).values) if bool(truth.any()) else None
    present, z = spread_z(margin, labels, q=q)
    zc = {int(c): float(v) for c, v in zip(present, z)} if z is not None else {}
    metrics = json.loads((d / "metrics.json").read_text())
    warm = (metrics.get("defense_metrics") or {}).get("trend", [{}])[0]
    others = [v for c, v in zc.items() if c != target]
    return {"run": d.parent.parent.name + "/" + d.name, "attack": metrics.get("attack"),
            "target": None if target is None else names[target], "poisoned": int(truth.sum()),
            "warmup_asr": None if warm.get("asr") is None else 100 * warm["asr"],
            "share_pick": [names[c] for c in suspicious_classes(prob, labels)],
            "spread_pick": [names[c] for c in classes_above(present, z, k=k)],
            "target_z": None if target is None else zc.get(target),
            "top_other_z": max(others) if others else None,
            "spread_z": {names[c]: v for c, v in zc.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", nargs="+", help="finished MeCa run directories")
    ap.add_argument("--q", type=float, default=0.9, help="the spread test's upper quantile (default 0.9)")
    ap.add_argument("--k", type=float, default=2.0, help="the spread test's robust z cut (default 2.0)")
    ap.add_argument("--out", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    if not 0.5 < args.q < 1 or not args.k > 0:
        print("meca_class_test.py: --q must lie in (0.5, 1) and --k above 0", file=sys.stderr)
        return 2
    dirs = [Path(d) for d in args.run_dir]
    bad = [str(d) for d in dirs if not (d / "meca_scores.pt").is_file()]
    if bad:
        print(f"meca_class_test.py: not a finished MeCa run (no meca_scores.pt): {', '.join(bad)}", file=sys.stderr)
        return 2
    rows = [read_run(d, args.q, args.k) for d in dirs]
    for r in rows:
        r["share_pick_s"] = ", ".join(r["share_pick"]) or "none"
        r["spread_pick_s"] = ", ".join(r["spread_pick"]) or "none"
    print_table(rows, [("run", "run", "{}"), ("target", "poisoned class", "{}"), ("poisoned", "poisoned", "{}"),
                       ("warmup_asr", "warm-up ASR %", "{:.2f}"), ("share_pick_s", "share test picks", "{}"),
                       ("spread_pick_s", "spread test picks", "{}"), ("target_z", "z of poisoned class", "{:.2f}"),
                       ("top_other_z", "largest other z", "{:.2f}")])
    if args.out:
        write_json(Path(args.out), {"q": args.q, "k": args.k,
                                    "rows": [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
