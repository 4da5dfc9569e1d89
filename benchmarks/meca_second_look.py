"""MeCa's second look and relabel-and-relearn, replayed on a finished run's clean model.

A MeCa run with label-aware detection picks a class, flags a group inside it and trains a clean
model without that group. ``recheck_below`` then lets the clean model take a second look at the
picked class's kept samples (those it gives their label a probability below the cut are flagged
too) and relabels and relearns the whole flagged set. This script replays that last step from
the run's saved ``meca_clean_model.pt`` (``save_models = true``, the default) with other
settings, so the cut, the epochs and the learning rate can be compared on one clean model
without training it again:

    python benchmarks/meca_second_look.py "benchmarks/results/sweeps/meca-cifar10-50k/runs/attack=tact,defense=meca-recheck" \\
        --variant below=0.5,epochs=3 --variant below=0.5,epochs=5 --variant below=0.3,epochs=3 \\
        --out benchmarks/results/meca_second_look_tact_50k.json

A variant sets any of ``below``, ``epochs``, ``lr``, ``relabel``, ``cut`` (``recheck_cut``),
``moved`` (``recheck_moved``), ``balance`` (``relearn_balance``), ``settings``
(``relearn_settings``) and ``rounds`` (``recheck_rounds``). Each variant starts from the same clean model; the table adds the
picked class's test accuracy, and the JSON every class's. The detection read from the run (its flagged
ids, ``meca_scores.pt``, and the picked class, ``history.jsonl``) is the defense's own; the
poison ids are read only to score the flagged set (recall, precision) and the ASR.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import meca_detect_record, parse_key_values, print_table, write_json  # noqa: E402
from per_class_accuracy import class_accuracies, test_predictions  # noqa: E402

KEYS = {"below": "recheck_below", "epochs": "recheck_epochs", "lr": "relearn_lr", "relabel": "relabel",
        "cut": "recheck_cut", "moved": "recheck_moved", "balance": "relearn_balance",
        "settings": "relearn_settings", "rounds": "recheck_rounds"}


def _medians(model, data, det, picked, truth_ids) -> dict:
    """The clean model's median ``p(label|x)`` over the picked classes' kept samples: the poisoned
    ones detection missed and the clean ones (ground truth read for this description only)."""
    import torch

    from bdframe.interfaces import ScoreContext
    from bdframe.scoring import logits

    kept = data.contains(det["kept_ids"]) & torch.isin(data.labels.cpu(), torch.as_tensor(picked, dtype=torch.int64))
    part = data.subset(kept)
    if not len(part):
        return {}
    p = torch.softmax(logits(model, part, ScoreContext(progress=False)).double(), 1)
    own = p[torch.arange(len(p)), part.labels.cpu()]
    bad = part.contains(truth_ids)
    med = {}
    for key, m in (("missed_poison", bad), ("kept_clean", ~bad)):
        med[f"{key}_count"] = int(m.sum())
        med[f"{key}_median_p"] = float(own[m].median()) if bool(m.any()) else None
    return med


def replay(run_dir: Path, variants: list[dict], device) -> list[dict]:
    import attrs
    import torch

    from bdframe.metrics import detection
    from bdframe.runner import RunContext
    from bdframe.scan import rebuild_parts
    from bdframe_defense_meca.plugin import MeCa

    for f in ("recipe.toml", "meca_clean_model.pt", "meca_scores.pt", "history.jsonl"):
        if not (run_dir / f).is_file():
            raise SystemExit(f"{run_dir}: {f} is missing (a finished MeCa run with save_models = true is needed)")
    parts = rebuild_parts(run_dir)
    if parts.recipe.defense.name != "meca":
        raise SystemExit(f"{run_dir}: not a MeCa run (defense {parts.recipe.defense.name!r})")
    data, truth_ids = parts.poisoned, parts.poison_ids
    saved = torch.load(run_dir / "meca_scores.pt", weights_only=False)
    flagged = saved["ids"][saved["detected_poison"]].cpu()
    det = {"flagged_ids": flagged, "kept_ids": data.ids[~data.contains(flagged)].cpu()}
    picked = meca_detect_record(run_dir)["suspicious_classes"]
    state = torch.load(run_dir / "meca_clean_model.pt", map_location="cpu", weights_only=True)
    rows = []
    for i, v in enumerate([None, *variants]):
        # a run context per variant: each replays the step under the same stage names
        with tempfile.TemporaryDirectory(prefix="meca-second-look-") as tmp:
            ctx = RunContext.for_parts(parts, device, Path(tmp), progress=False)
            if v is None:
                model = ctx.new_model(state_dict=state)
                rows.append({"variant": "clean model (no second look)", **ctx.evaluate(model),
                             "class_acc": class_accuracies(test_predictions(model, parts.test, device), parts.test),
                             **detection(flagged, truth_ids, data.ids), **_medians(model, data, det, picked, truth_ids)})
                continue
            config = attrs.evolve(parts.recipe.defense.config, relearn=False,
                                  **{KEYS[k]: val for k, val in v.items()})
            meca = MeCa(config)
            relearner = meca.relearn_stage(ctx)
            model = ctx.new_model(state_dict=state)
            t = time.perf_counter()
            done = meca.relabel_and_relearn(ctx, data, det, model, relearner,
                                            picked if config.recheck_below > 0 else [])
            suspected = torch.cat([flagged, done["rechecked_ids"]])
            rows.append({"variant": ",".join(f"{k}={val}" for k, val in v.items()), **done["eval"],
                         "class_acc": class_accuracies(test_predictions(model, parts.test, device), parts.test),
                         "rechecked": len(done["rechecked_ids"]), "relabelled": done["relabelled"],
                         "label_changed": done["label_changed"], "cuts": done["cuts"], "rounds": done.get("rounds"), "seconds": time.perf_counter() - t,
                         **detection(suspected, truth_ids, data.ids)})
            print(f"{rows[-1]['variant']}: ACC {100 * rows[-1]['clean_acc']:.2f}%, ASR "
                  f"{100 * rows[-1].get('asr', float('nan')):.2f}%", file=sys.stderr, flush=True)
    return [dict(r, run=str(run_dir), picked=picked) for r in rows]


def _flag(val, key: str) -> bool:
    if isinstance(val, bool):
        return val
    if str(val).lower() in ("1", "true"):
        return True
    if str(val).lower() in ("0", "false"):
        return False
    raise SystemExit(f"--variant: {key} must be true or false, not {val!r}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished MeCa run directories")
    ap.add_argument("--variant", action="append", default=[],
                    help='below=X,epochs=N,lr=Y,relabel="changed",cut="class",moved=true,balance=true,settings="meca" (any subset; the run\'s own settings otherwise); repeatable')
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/meca_second_look.json"))
    args = ap.parse_args(argv)
    import torch

    variants = []
    for text in args.variant or ["below=0.5"]:
        v = parse_key_values(text.split(","), "--variant")
        bad = sorted(set(v) - set(KEYS))
        if bad:
            ap.error(f"--variant {text!r}: unknown key {bad[0]!r} (allowed: {', '.join(KEYS)})")
        variants.append({k: (int(val) if k in ("epochs", "rounds") else str(val) if k in ("relabel", "cut", "settings")
                             else _flag(val, k) if k in ("moved", "balance") else float(val))
                         for k, val in v.items()})
    rows = []
    for d in args.runs:
        rows += replay(d, variants, torch.device(args.device))
    for r in rows:
        r["acc_pct"], r["asr_pct"] = 100 * r["clean_acc"], 100 * r.get("asr", float("nan"))
        r["recall_pct"], r["precision_pct"] = 100 * r["recall"], 100 * r["precision"]
    for r in rows:
        r["name"] = Path(r["run"]).name
        accs = [r["class_acc"][k] for k in r["picked"] if k < len(r["class_acc"]) and r["class_acc"][k] is not None]
        r["picked_acc_pct"] = 100 * sum(accs) / len(accs) if accs else float("nan")
    print_table(rows, [("name", "run", "{}"), ("variant", "variant", "{}"), ("acc_pct", "ACC %", "{:.2f}"),
                       ("asr_pct", "ASR %", "{:.2f}"), ("picked_acc_pct", "picked class ACC %", "{:.2f}"), ("flagged", "flagged", "{}"), ("recall_pct", "recall %", "{:.2f}"),
                       ("precision_pct", "precision %", "{:.2f}")])
    for r in rows:
        if r.get("missed_poison_count") is not None:
            med = {k: "-" if r[k] is None else f"{r[k]:.3f}" for k in ("missed_poison_median_p", "kept_clean_median_p")}
            print(f"{r['name']}: in the picked class {r['picked']}, the clean model gives the "
                  f"{r['missed_poison_count']} poisoned samples detection missed their label with a median "
                  f"probability of {med['missed_poison_median_p']}, the {r['kept_clean_count']} clean ones "
                  f"{med['kept_clean_median_p']}")
    write_json(args.out, {"variants": variants, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
