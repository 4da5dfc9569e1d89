"""The label-aware class test's z-scores of finished MeCa runs: which class each run picked, the
target's z-score and the largest z-score of any other class, and how many classes each cut of
``spread_k`` would pick.

MeCa's label-aware detection picks the class whose z-score (for ``class_stat =
"gap-separation-floor"`` the largest of the gap, the separation and the runner-up floor z-scores
of the warm-up model) lies above ``spread_k``. Each run logs every class's z-scores in the
``meca-detect`` record of its ``history.jsonl``; this script only reads them (no model is run),
with the attack's target class from the run's ``recipe.toml``, so it tells, for any cut, which
rows would keep their pick and where a clean class would be picked.

    python benchmarks/meca_class_z.py benchmarks/results/sweeps/meca-defaults-heldout-50k \\
        --defense meca-floor-side --cuts 2 2.5 3 --out benchmarks/results/meca_class_z_heldout_50k.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402
from bdframe_defense_meca.plugin import classes_above  # noqa: E402


def class_z(history: Path) -> tuple[list | None, dict | None]:
    """The classes the label-aware class test picked and each class's z-score (the largest over
    the statistics and models the test read), from the run's ``meca-detect`` record; (None,
    None) for a run without a class test."""
    for line in history.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("stage") != "meca-detect":
            continue
        zs = next((v for k, v in rec.items() if k.startswith("class_") and k.endswith("_z")), None)
        if zs is None:
            return None, None
        # one entry per model read ("warmup", "enhanced"), and one per statistic ("warmup-gap", ...)
        tags = [t for t in zs if "-" not in t]
        top = {int(c): max((zs[t][c] for t in tags if zs[t].get(c) is not None), default=None)
               for c in zs[tags[0]]}
        return rec.get("suspicious_classes"), top
    return None, None


def row(run: Path, cuts: list[float]) -> dict | None:
    import tomllib

    history = run / "history.jsonl"
    if not (run / "metrics.json").is_file() or not history.is_file():
        return None  # not finished
    picked, z = class_z(history)
    if z is None:
        return None
    recipe = tomllib.loads((run / "recipe.toml").read_text())
    target = recipe.get("attack", {}).get("target")
    others = {c: v for c, v in z.items() if c != target and v is not None}
    top_other = max(others, key=others.get) if others else None
    r = {"run": run.name, "target": target, "picked": picked,
         "target_z": z.get(target) if target is not None else None,
         "top_other_class": top_other, "top_other_z": others.get(top_other),
         "z": {str(c): v for c, v in z.items()}}
    known = [c for c, v in z.items() if v is not None]
    for k in cuts:  # MeCa's own rule with spread_max_classes = 1: the largest z above the cut
        pick = classes_above(known, [z[c] for c in known], k=k, limit=1)
        r[f"pick_at_{k:g}"] = pick[0] if pick else None
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweeps", nargs="+", type=Path, help="sweep result directories (each with runs/)")
    ap.add_argument("--defense", action="append", default=[],
                    help="read only runs whose name ends with defense=NAME (repeatable; default: every MeCa run "
                         "with a class test)")
    ap.add_argument("--cuts", type=float, nargs="+", default=[2.0, 2.5, 3.0], help="spread_k values to compare")
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    rows = []
    for sweep in args.sweeps:
        runs = sweep / "runs"
        if not runs.is_dir():
            print(f"{sweep}: no runs/ directory (expected a sweep's result directory)", file=sys.stderr)
            return 2
        for run in sorted(runs.iterdir()):
            if args.defense and not any(run.name.endswith(f"defense={d}") for d in args.defense):
                continue
            r = row(run, args.cuts)
            if r is not None:
                rows.append({"sweep": sweep.name, **r})
    cols = [("run", "run", "{}"), ("target", "target", "{}"), ("picked", "picked", "{}"),
            ("target_z", "target z", "{:.2f}"), ("top_other_class", "top other", "{}"),
            ("top_other_z", "its z", "{:.2f}")]
    cols += [(f"pick_at_{k:g}", f"pick at {k:g}", "{}") for k in args.cuts]
    print_table(rows, cols)
    if args.out:
        write_json(args.out, {"benchmark": "meca_class_z", "sweeps": [str(s) for s in args.sweeps],
                              "cuts": args.cuts, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
