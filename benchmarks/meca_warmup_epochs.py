"""What MeCa's class test sees after each epoch of its warm-up, on a sweep's rows.

MeCa's label-aware detection picks the poisoned class from the warm-up model (``class_test =
"warmup"``). How well a class stands out depends on how far the warm-up has fitted the clean
samples: the spread test reads how much more confidently a group of the class is fitted than
the class's median sample, and a model that fits every class confidently leaves little room
for that. This script trains MeCa's warm-up exactly as a MeCa run of the sweep would (the same
stage, settings, seeds, model initialisation and bfloat16 setting) and after every epoch reads,
from the model as it stands:

- the spread test (``class_stat = "spread"``): each class's robust z-score, the poisoned
  class's beside the largest of the others, and which classes the test (``spread_k``) picks;
- the gap test (``class_stat = "gap"``): each class's features split by 2-means (as ``inside =
  "clusters"`` splits a picked class), the gap between the two clusters' mean margins as a
  robust z-score among the classes; and inside the poisoned class, the recall and precision of
  the cluster with the higher mean margin (what ``inside = "clusters"`` would flag if the
  enhanced model ranked the clusters as the warm-up does);
- the model's clean ACC and ASR on the test set.

The poisoned class and the poison ids are read only to label and evaluate the rows; no
statistic sees them. One row per attack, each trained in this process one after the other:

    python benchmarks/meca_warmup_epochs.py benchmarks/sweeps/meca-cifar10-50k.toml \\
        --attacks blend --out benchmarks/results/meca_warmup_epochs_50k.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

Q, K = 0.9, 2.0  # the spread test's defaults, also the gap test's cut (spread_k)


def class_stats(model, data, labels, ids, truth, seed: int) -> dict:
    """The per-class statistics of one model state (see the module docstring), computed by the
    functions MeCa's detection uses, with the same 2-means keys."""
    import torch

    from bdframe.interfaces import ScoreContext
    from bdframe.scoring import features
    from bdframe_defense_meca.plugin import cluster_gaps, cluster_split, gap_floor, margins, robust_class_z, spread_z

    sctx = ScoreContext(progress=False)
    feats = features(model, data, sctx)
    with torch.no_grad():
        was = model.training
        model.eval()
        dev = next(model.parameters()).device
        z = torch.cat([model.head(f.to(dev)).float().cpu() for f in feats.split(1024)])
        model.train(was)
    feats = feats.double()
    margin = margins(z, labels)
    key = ("meca-clusters", int(seed))
    classes, sz = spread_z(margin, labels, q=Q)
    _, gaps = cluster_gaps(feats, margin, labels, ids, key)
    gz = robust_class_z(gaps, floor=gap_floor(margin, labels, classes))  # gap_z's, without clustering twice
    inside = {}
    for c in classes.tolist():
        rows = labels == c
        t = truth[rows]
        if bool(t.any()):
            # the group inside = "clusters" would flag, decided here by the warm-up model's own margins
            flag = cluster_split(feats[rows], margin[rows], ids[rows], key)
            tp = int((flag & t).sum())
            inside[c] = {"recall": 100 * tp / int(t.sum()), "precision": 100 * tp / max(int(flag.sum()), 1),
                         "flagged": int(flag.sum())}
    return {"classes": classes.tolist(), "spread_z": None if sz is None else sz.tolist(), "gap": gaps.tolist(),
            "gap_z": None if gz is None else gz.tolist(), "inside": inside}


def run_row(sweep: dict, attack: str, epochs: int | None, device) -> dict:
    import attrs
    import torch

    from bdframe.build import materialise
    from bdframe.plugins import load_registry
    from bdframe.recipe import loads_dict
    from bdframe.runner import RunContext
    from bdframe.training import cpu_bf16_supported

    registry = load_registry()
    data = {k: v for k, v in sweep["base"].items()}
    data["name"] = f"warmup-epochs-{attack}"
    if attack != "none":
        data["attack"] = {"name": attack}
    defense = {"name": "meca"}
    data["defense"] = defense
    recipe = loads_dict(data, registry=registry, source=data["name"])
    meca = recipe.defense.config
    parts = materialise(recipe, registry)
    ctx = RunContext.for_parts(parts, device, None, progress=False)
    defense = registry.get("defense", "meca")(meca)
    trainer = defense.warmup_trainer(ctx, epochs)  # the stage a MeCa run of this recipe trains
    amp = trainer.config.amp
    train = parts.poisoned
    ids, labels = train.ids, train.labels
    truth = torch.isin(ids, torch.as_tensor(parts.poison_ids, dtype=torch.int64))
    target = int(torch.mode(labels[truth]).values) if bool(truth.any()) else None
    model = ctx.new_model()  # MeCa's first model: the warm-up's initialisation
    epochs_out = []
    t_train = [0.0]
    t_last = [time.perf_counter()]

    def on_epoch(rec):
        t_train[0] += time.perf_counter() - t_last[0]
        s = class_stats(model, train, labels, ids, truth, recipe.seed)
        ev = ctx.evaluate(model)
        picked = [] if s["spread_z"] is None else [c for c, zc in zip(s["classes"], s["spread_z"]) if zc > K]
        row = {"epoch": rec["epoch"], "train_seconds": t_train[0], "acc": 100 * ev["clean_acc"],
               "asr": 100 * ev["asr"] if ev.get("asr") is not None else None,
               "spread_picked": [train.classes[c] for c in picked], **s}
        if target is not None and s["spread_z"] is not None:
            i = s["classes"].index(target)
            row["target_spread_z"] = s["spread_z"][i]
            row["other_spread_z"] = max(zc for j, zc in enumerate(s["spread_z"]) if j != i)
            if s["gap_z"] is not None:
                row["target_gap_z"] = s["gap_z"][i]
                row["other_gap_z"] = max(zc for j, zc in enumerate(s["gap_z"]) if j != i)
            row.update({f"target_cluster_{k}": v for k, v in s["inside"].get(target, {}).items()})
        elif s["spread_z"] is not None:
            row["other_spread_z"] = max(s["spread_z"])
            row["other_gap_z"] = max(s["gap_z"]) if s["gap_z"] is not None else None
        epochs_out.append(row)
        print(f"  {attack} epoch {rec['epoch']}: ACC {row['acc']:.2f} ASR {row.get('asr') or 0:.2f} "
              f"spread z target {row.get('target_spread_z', float('nan')):.2f} other {row['other_spread_z']:.2f} "
              f"gap z target {row.get('target_gap_z', float('nan')):.2f} other {row.get('other_gap_z') or 0:.2f}",
              flush=True)
        t_last[0] = time.perf_counter()

    st = attrs.evolve(ctx.stage("meca-warmup"), on_epoch=on_epoch)
    t_last[0] = time.perf_counter()
    trainer.fit(model, train, st)
    return {"attack": attack, "target": train.classes[target] if target is not None else None,
            "amp": amp, "bf16_native": cpu_bf16_supported(), "epochs": epochs_out}


def main(argv=None) -> int:
    import platform

    import toml

    from bdframe.nn import resolve_device

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", help="a sweep TOML whose [base] is the configuration (e.g. meca-cifar10-50k.toml)")
    ap.add_argument("--attacks", nargs="+", default=["none", "badnet", "blend"],
                    help="attack plugins to poison with (none: the clean data)")
    ap.add_argument("--epochs", type=int, help="warm-up epochs (default: MeCa's warmup_epochs)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    sweep = toml.load(args.sweep)
    device = resolve_device(args.device)
    rows = []
    for attack in args.attacks:
        rows.append(run_row(sweep, attack, args.epochs, device))
        table = []
        for r in rows:
            for e in r["epochs"]:
                table.append({"row": r["attack"], **{k: e.get(k) for k in (
                    "epoch", "train_seconds", "acc", "asr", "target_spread_z", "other_spread_z", "target_gap_z",
                    "other_gap_z", "target_cluster_recall", "target_cluster_precision")},
                    "picked": ", ".join(e["spread_picked"]) or "none"})
        if args.out:
            write_json(Path(args.out), {"sweep": str(args.sweep), "cpu": platform.processor() or platform.machine(),
                                        "rows": rows})
    print_table(table, [("row", "row", "{}"), ("epoch", "epoch", "{}"), ("train_seconds", "train s", "{:.0f}"),
                        ("acc", "ACC", "{:.2f}"), ("asr", "ASR", "{:.2f}"),
                        ("target_spread_z", "spread z poisoned", "{:.2f}"),
                        ("other_spread_z", "spread z other max", "{:.2f}"), ("picked", "spread picks", "{}"),
                        ("target_gap_z", "gap z poisoned", "{:.2f}"), ("other_gap_z", "gap z other max", "{:.2f}"),
                        ("target_cluster_recall", "cluster recall", "{:.1f}"),
                        ("target_cluster_precision", "cluster precision", "{:.1f}")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
