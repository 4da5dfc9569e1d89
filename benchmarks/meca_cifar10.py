"""MeCa end to end on real CIFAR-10 (issue: MeCa), in the layout of the MeCa paper's Table II/VII.

Each row is one attack at 5% poison (or ``none``, the clean dataset) and runs, in this process:

1. the **no-defense** model: the CPU-sized configuration of ``_common.cpu_recipe`` trained on
   the poisoned set (its training time is the unit of the wall-time multiple);
2. **MeCa** with the same recipe (the recipe's ``[train]`` stage is MeCa's clean training) and
   ``relearn = true``: the clean model before relearning gives "MeCa" ACC/ASR, the model after
   relearning gives "MeCa+RL".

Reported per row: ACC/ASR without defense, with MeCa and with MeCa+RL; detection recall,
precision and FPR of MeCa's split; MeCa's wall time (without and with relearning) as a multiple
of the no-defense training time measured in the same row; and, from ``meca_scores.pt``, the
AUROC of the adv-kl consistency score at every iteration (iteration 1 scores the warm-up model)
and of the enhanced model's ``p(y|x)``, against the ground-truth poison flags (ground truth is
read only here, never by the defense).

Rows already in the JSON (same configuration) are kept; ``--recompute`` redoes them. ``--only``
runs single rows by name. ``--meca KEY=VALUE`` changes a MeCa option (and so the configuration
key: rows with other options are kept apart).

    python benchmarks/meca_cifar10.py                   # all nine rows, 15-21 minutes each on 2 CPU cores
    python benchmarks/meca_cifar10.py --only badnet     # one row
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (add_meca_table_args, add_results_args, cifar10_tree, cpu_recipe,  # noqa: E402
                     meca_table_config, print_table, read_json, run_recipe, write_json)

ROWS = ["none", "badnet", "blend", "sig", "wanet", "physicalba", "tact", "adaptive-blend", "adaptive-patch"]
TRIGGERS = Path(__file__).resolve().parents[2] / "shared" / "triggers"
#: extra rows: an attack with non-default options (the papers' own trigger image, another target)
VARIANTS = {
    "blend-kitty": {"name": "blend", "trigger_image": str(TRIGGERS / "hellokitty_32.png"), "alpha": 0.2},
    "adaptive-blend-kitty": {"name": "adaptive-blend", "trigger_image": str(TRIGGERS / "hellokitty_32.png")},
    "badnet-target0": {"name": "badnet", "target": 0},
}


def _score_aurocs(run_dir: Path, poison_ids: list[int]) -> dict:
    """AUROC of MeCa's per-iteration consistency scores and of the enhanced-model score."""
    import torch

    from bdframe.detection import auroc

    s = torch.load(run_dir / "meca_scores.pt", weights_only=False)
    truth = torch.isin(s["ids"], torch.as_tensor(poison_ids, dtype=torch.int64))
    if not bool(truth.any()):
        return {}
    return {"adv_kl_auroc": [auroc(sc, truth) for sc in s["consistency_scores"]],
            "enhanced_auroc": auroc(s["enhanced_prob"], truth)}


def _run(recipe: dict, run_dir: Path, reuse: bool, what: str) -> dict:
    """Run ``recipe`` into ``run_dir``; with ``reuse``, a finished run whose resolved recipe equals
    this one is read back instead (e.g. after the table step failed)."""
    from bdframe import recipe as rmod
    from bdframe.plugins import load_registry

    if reuse and (run_dir / "metrics.json").is_file():
        registry = load_registry()
        want = rmod.loads_dict(recipe, registry=registry, source=recipe["name"]).to_toml()
        have = rmod.loads_dict(rmod.parse_toml(run_dir / "recipe.toml"), registry=registry, source=str(run_dir)).to_toml()
        if want == have:
            print(f"{what}: reusing the finished run {run_dir}", file=sys.stderr, flush=True)
            m = json.loads((run_dir / "metrics.json").read_text())
            m["run_dir"] = str(run_dir)
            return m
    print(f"{what} ...", file=sys.stderr, flush=True)
    return run_recipe(recipe, run_dir, progress=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_meca_table_args(ap)
    ap.add_argument("--only", nargs="+", choices=ROWS + list(VARIANTS), help="rows to run (default: all)")
    add_results_args(ap, "meca_cifar10.json")
    ap.add_argument("--reuse-runs", action="store_true",
                    help="build a missing row from finished run directories with the same recipe instead of rerunning")
    args = ap.parse_args(argv)

    config, meca = meca_table_config(args)
    out = Path(args.out)
    saved = read_json(out, {})
    configs = saved.get("configs", [])
    entry = next((c for c in configs if c["config"] == config), None)
    if entry is None:
        entry = {"config": config, "rows": {}}
        configs.append(entry)
    rows = entry["rows"]
    tag = "-".join(f"{k}{v}" for k, v in sorted(meca.items()) if k not in ("relearn", "relearn_epochs",
                                                                           "evaluate_each_epoch"))
    root = cifar10_tree(args.data)
    for name in args.only or ROWS:
        if name in rows and not args.recompute:
            print(f"{name}: kept from {out.name} (use --recompute to redo)", file=sys.stderr)
            continue
        base = cpu_recipe(root, train_size=args.train_size, epochs=args.epochs, width=args.width,
                          device=args.device, seed=args.seed)
        if name in VARIANTS:
            base["attack"] = {**VARIANTS[name], "poison_rate": args.poison_rate}
        elif name != "none":
            base["attack"] = {"name": name, "poison_rate": args.poison_rate}
        plain = dict(base, name=f"meca-bench-{name}-nodefense-n{args.train_size}")
        defended = dict(base, name=f"meca-bench-{name}-meca-n{args.train_size}" + (f"-{tag}" if tag else ""),
                        defense={"name": "meca", **meca})
        m0 = _run(plain, out.parent / "runs" / plain["name"], args.reuse_runs, f"{name}: no defense")
        m1 = _run(defended, out.parent / "runs" / defended["name"], args.reuse_runs, f"{name}: MeCa")
        dm = m1["defense_metrics"]
        t0 = m0["seconds"]["defense"]
        t1 = m1["seconds"]["defense"]
        t_rl = dm["stage_seconds"].get("relearn", 0.0)
        poison_ids = json.loads((Path(m1["run_dir"]) / "poison.json").read_text()).get("poison_ids", [])
        det = m1.get("detection", {})
        row = {
            "attack": name, "train_size": m0["train_size"], "num_poison": m0["num_poison"],
            "acc_none": 100 * m0["clean_acc"], "asr_none": 100 * m0["asr"] if "asr" in m0 else None,
            "acc_meca": 100 * dm["clean_model"]["clean_acc"],
            "asr_meca": 100 * dm["clean_model"]["asr"] if "asr" in dm["clean_model"] else None,
            "acc_meca_rl": 100 * m1["clean_acc"], "asr_meca_rl": 100 * m1["asr"] if "asr" in m1 else None,
            "recall": 100 * det["recall"] if det else None, "precision": 100 * det["precision"] if det else None,
            "fpr": 100 * det["fpr"] if det else None,
            "flagged_share": 100 * dm["split"]["poison_share"], "kept": dm["split"]["clean"],
            "seconds_none": t0, "seconds_meca": t1 - t_rl, "seconds_meca_rl": t1,
            "x_time": (t1 - t_rl) / t0, "x_time_rl": t1 / t0, "stage_seconds": dm["stage_seconds"],
            "trend": dm["trend"], **_score_aurocs(Path(m1["run_dir"]), poison_ids),
            "run_dirs": [m0["run_dir"], m1["run_dir"]],
        }
        rows[name] = row
        write_json(out, {"benchmark": "meca_cifar10", "configs": configs})
        print(f"{name}: ACC {row['acc_none']:.2f} -> {row['acc_meca']:.2f} / {row['acc_meca_rl']:.2f}; "
              f"ASR {row['asr_none']} -> {row['asr_meca']} / {row['asr_meca_rl']}; recall {row['recall']}, "
              f"precision {row['precision']}; x{row['x_time']:.2f}", file=sys.stderr, flush=True)
    table = [dict(rows[n], adv_kl_auroc_1=(rows[n].get("adv_kl_auroc") or [None])[0]) for n in ROWS + list(VARIANTS) if n in rows]
    print(f"\nMeCa on CIFAR-10 (train {args.train_size}, test 10,000), {100 * args.poison_rate:g}% poison, "
          f"simple-cnn width {args.width}, {args.epochs} epochs; MeCa options {meca}")
    print_table(table, [("attack", "attack", "{}"), ("acc_none", "ACC none", "{:.2f}"), ("asr_none", "ASR none", "{:.2f}"),
                        ("acc_meca", "ACC MeCa", "{:.2f}"), ("asr_meca", "ASR MeCa", "{:.2f}"),
                        ("acc_meca_rl", "ACC +RL", "{:.2f}"), ("asr_meca_rl", "ASR +RL", "{:.2f}"),
                        ("recall", "recall %", "{:.1f}"), ("precision", "precision %", "{:.1f}"),
                        ("flagged_share", "flagged %", "{:.1f}"), ("adv_kl_auroc_1", "adv-kl AUROC", "{:.3f}"),
                        ("x_time", "time x", "{:.2f}"), ("x_time_rl", "time x +RL", "{:.2f}")])
    return rows


if __name__ == "__main__":
    main()
