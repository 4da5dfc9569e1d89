"""MeCa's detection rules side by side on synthetic data (CPU, ~5 min).

Runs ``examples/meca-paper-quickstart.toml`` (or ``--recipe``; BadNet at 10%) and the same recipe
without the attack, once per detection rule, and prints clean ACC, ASR, detection
recall/precision and the flagged share; writes ``benchmarks/results/meca_detection_synthetic.json``.
A rule's settings are laid over the recipe's, and what neither sets is the paper's pipeline,
except for the rules "the defaults" (the recipe's [defense] as it is) and "the defaults, spread_k 2"
(the same with the class test's earlier cut). Each row records the classes the label-aware class
test picked and every class's z-score. The rules never see ground truth; it is used here only to
score them.

    python benchmarks/meca_detection_synthetic.py
    python benchmarks/meca_detection_synthetic.py --rules "argmax (paper)" "unlearn, warm-up classes" --out F.json
    python benchmarks/meca_detection_synthetic.py --recipe examples/meca-quickstart.toml --seeds 0 1 2 3 \\
        --rules "argmax (paper), 5 iterations" "the defaults" --out benchmarks/results/meca_detection_synthetic_defaults.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, add_results_args, print_table, read_json, run_recipe, write_json  # noqa: E402
from meca_class_z import class_z  # noqa: E402
from bdframe_defense_meca.plugin import PAPER_SETTINGS  # noqa: E402

RULES = [("argmax (paper)", {"detection": "argmax"}),
         # the paper's pipeline with examples/meca-paper-quickstart.toml's shorter enhancement
         ("argmax (paper), 5 iterations", {"detection": "argmax", "iterations": 5, "alpha_step": 0.1}),
         ("confidence, mad", {"detection": "confidence", "threshold": "mad"}),
         ("confidence, otsu", {"detection": "confidence", "threshold": "otsu"}),
         ("label-aware", {"detection": "label-aware"}),
         ("label-aware, protect 0.99", {"detection": "label-aware", "protect_confident": 0.99}),
         ("label-aware, inside reference", {"detection": "label-aware", "inside": "reference"}),
         # the MeCa sweep's meca-unlearn-warmup column: classes picked by the warm-up model, the
         # partition that passes over the least consistent 10%, a clean training that unlearns
         # the flagged set, no relearning
         ("unlearn, warm-up classes", {"detection": "label-aware", "class_test": "warmup", "forget_skip": 0.1,
                                       "clean_unlearn": 0.6, "relearn": False}),
         # the same with the class picked by the spread of the warm-up model's margins, at most one
         # (the MeCa sweeps' meca-spread-top column); with and without relabel-and-relearn
         ("spread, top class", {"detection": "label-aware", "class_test": "warmup", "class_stat": "spread",
                                "spread_max_classes": 1, "forget_skip": 0.1, "clean_unlearn": 0.6, "relearn": False}),
         ("spread, top class, relearn", {"detection": "label-aware", "class_test": "warmup", "class_stat": "spread",
                                         "spread_max_classes": 1, "forget_skip": 0.1, "clean_unlearn": 0.6}),
         # the MeCa 50k sweep's meca-gapsep-far-auto column: no enhancement, the class picked by the
         # gap-separation test on the warm-up model, split by its feature clusters, the side chosen
         # by split_side = "auto", the far core of the flagged group unlearned
         ("gap-separation, far core, auto side", {"iterations": 0, "detection": "label-aware", "class_test": "warmup",
                                                  "class_stat": "gap-separation", "spread_max_classes": 1,
                                                  "inside": "clusters", "split_side": "auto", "forget_skip": 0.1,
                                                  "clean_unlearn": 2.0, "clean_unlearn_core": True, "core_side": "far",
                                                  "relearn": False}),
         ("gap-separation-floor, far core, auto-floor side", {
             "iterations": 0, "detection": "label-aware", "class_test": "warmup", "class_stat": "gap-separation-floor",
             "spread_max_classes": 1, "inside": "clusters", "split_side": "auto-floor", "forget_skip": 0.1,
             "clean_unlearn": 2.0, "clean_unlearn_core": True, "core_side": "far", "relearn": False}),
         # the recipe's [defense] as it is: with examples/meca-quickstart.toml, bdframe's defaults
         ("the defaults", {}),
         # the defaults with the class test's cut of before (2; 3 since)
         ("the defaults, spread_k 2", {"spread_k": 2.0}),
         # the defaults before the clean model's second look (recheck_below) was added to them
         ("the defaults before the second look", {"recheck_below": 0.0}),
         ("the defaults before the second look, spread_k 2", {"spread_k": 2.0, "recheck_below": 0.0}),
         # the defaults with two rounds of the second look and relearning
         ("the defaults, two rounds", {"recheck_rounds": 2})]

# what a rule does not set is the paper's pipeline (the defense's defaults are bdframe's), except
# for the rules named "the defaults...", which lay their settings over the defaults
PAPER = {**PAPER_SETTINGS, "forget_skip": 0.0}


def main(argv=None) -> int:
    import tomllib

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_results_args(ap, "meca_detection_synthetic.json")
    ap.add_argument("--recipe", default="examples/meca-paper-quickstart.toml",
                    help="the recipe run with and without its attack (default: %(default)s)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="SEED",
                    help="run every rule with each of these seeds (default: 0)")
    ap.add_argument("--rules", nargs="+", metavar="RULE", choices=[label for label, _ in RULES],
                    help="run only these rules (default: all); names as in the table")
    args = ap.parse_args(argv)
    out = Path(args.out)
    rows = [] if args.recompute else read_json(out, [])
    done = {(r["data"], r["rule"], r.get("seed", 0)) for r in rows}
    base = tomllib.loads((REPO / args.recipe).read_text())
    base["device"] = "cpu"
    for seed in args.seeds:
        for data in ("badnet", "clean"):
            for label, params in RULES:
                if (data, label, seed) in done or (args.rules and label not in args.rules):
                    continue
                # the recipe's own settings win over the paper's, the rule's over both
                recipe = {**base, "seed": seed,
                          "defense": {**({} if label.startswith("the defaults") else PAPER), **base["defense"], **params}}
                if data == "clean":
                    recipe.pop("attack")
                with tempfile.TemporaryDirectory() as tmp:
                    m = run_recipe(recipe, Path(tmp) / "run")
                    picked, top_z = class_z(Path(tmp) / "run" / "history.jsonl")
                dm = m["defense_metrics"]
                det = m.get("detection", {})
                rows.append({"data": data, "rule": label, "seed": seed, "params": params,
                             "warmup_acc": 100 * dm["trend"][0]["clean_acc"], "acc": 100 * m["clean_acc"],
                             "asr": 100 * m["asr"] if "asr" in m else None,
                             "recall": 100 * det["recall"] if det else None,
                             "precision": 100 * det["precision"] if det.get("flagged") else None,
                             "flagged": 100 * dm["split"]["poison_share"],
                             "picked": picked, "top_z": top_z})
                write_json(out, rows)
                print(f"seed {seed} {data} / {label}: done", file=sys.stderr)
    for r in rows:
        known = [z for z in (r.get("top_z") or {}).values() if z is not None]
        r["max_z"] = max(known) if known else None
    print_table(rows, [("data", "data", "{}"), ("rule", "rule", "{}"), ("seed", "seed", "{}"), ("warmup_acc", "ACC warm-up", "{:.2f}"),
                       ("acc", "ACC MeCa", "{:.2f}"), ("asr", "ASR MeCa", "{:.2f}"), ("recall", "recall %", "{:.1f}"),
                       ("precision", "precision %", "{:.1f}"), ("flagged", "flagged %", "{:.1f}"),
                       ("picked", "class picked", "{}"), ("max_z", "largest z", "{:.2f}")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
