"""How much of MeCa's clean-accuracy loss is the size of the kept set, and how much is which
samples it keeps?

MeCa trains its clean model from scratch on the samples its detection does not flag (the kept
set). For every finished MeCa run of a sweep (the runs whose ``defense`` label is
``--defense``, by default the paper's rule, ``meca-paper``, of ``benchmarks/sweeps/meca-cifar10.toml``),
this trains the plain recipe of the same row's no-defense run (no attack, no defense) on a
random class-balanced subset of the *same size* as the kept set, and prints it beside MeCa's
clean-model ACC (before relabel-and-relearn) and the kept set's class balance. Reference sizes
(``--sizes``; default 5,000, the half of the data MeCa's alpha_max = 0.5 partition treats as
clean) are trained too.

- ACC(no defense) - ACC(random subset of size |kept|) is what the size alone costs;
- ACC(random subset of size |kept|) - ACC(MeCa clean model) is what the choice of samples costs
  (hard, atypical or class-skewed samples, and any poison kept).

The plain trainings are kept in ``results/meca_kept_size.json`` by recipe and size
(``--recompute`` redoes them); their run directories go to ``results/runs/kept-size-n<size>``.

    bdframe sweep run benchmarks/sweeps/meca-cifar10.toml --only defense=none --only defense=meca-paper
    python benchmarks/meca_kept_size.py benchmarks/results/sweeps/meca-cifar10 --defense meca-paper
    python benchmarks/meca_kept_size.py --only none badnet       # some rows
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, add_results_args, print_table, read_json, run_recipe, write_json  # noqa: E402


def kept_class_shares(run_dir: Path) -> dict:
    """Size and smallest/largest class share (%) of a MeCa run's kept set: the training samples
    not in ``suspected.json``, by the label each carries."""
    import torch

    from bdframe.scan import load_run

    train = load_run(run_dir, device=torch.device("cpu"))[0].poisoned
    flagged = torch.as_tensor(json.loads((run_dir / "suspected.json").read_text())["suspected_ids"],
                              dtype=torch.int64)
    kept = ~train.contains(flagged)
    counts = torch.bincount(train.labels[kept], minlength=int(train.labels.max()) + 1).double()
    shares = 100 * counts / counts.sum()
    return {"kept": int(kept.sum()), "min_class_share": float(shares.min()), "max_class_share": float(shares.max())}


def plain_recipe(reference_dir: Path) -> dict:
    """The recipe of a no-defense run with its attack, name and output directory removed,
    resolved again by the installed plugins (so runs made before an option was added give the
    same recipe): the plain training whose subset size is varied (``dataset.train_size``)."""
    from bdframe import recipe as rmod
    from bdframe.plugins import load_registry

    r = tomllib.loads((reference_dir / "recipe.toml").read_text(encoding="utf-8"))
    r.pop("attack", None)
    r = tomllib.loads(rmod.loads_dict(r, registry=load_registry(), source=str(reference_dir),
                                      check_dataset=False).to_toml())
    for key in ("name", "output_dir"):
        r.pop(key, None)
    r["dataset"].pop("train_size", None)
    return r


def sweep_rows(sweep_dir: Path, defense: str) -> list[dict]:
    """``[{"row", "run_dir", "reference_dir"}]``: each finished run with ``defense`` and the
    finished no-defense run with the same other labels (``bdframe report``'s reference; rows
    without one are skipped, with a note)."""
    from bdframe.report import FINISHED, load_runs, no_defense_references

    _, axes, runs = load_runs(sweep_dir)
    if "defense" not in axes:
        raise SystemExit(f"{sweep_dir}: the sweep has no defense axis (its axes: {', '.join(axes)})")
    if defense not in axes["defense"]:
        raise SystemExit(f"--defense {defense!r} is not a label of the sweep's defense axis "
                         f"({', '.join(axes['defense'])})")
    references = no_defense_references(runs, axes)
    rows = []
    for r in runs:
        if r.labels["defense"] != defense or r.status != FINISHED:
            continue
        ref = references(r)
        if not ref:
            print(f"{r.name}: no finished no-defense run of the same row; skipped", file=sys.stderr)
            continue
        row = ",".join(v for k, v in r.labels.items() if k != "defense")
        rows.append({"row": row, "run_dir": r.dir, "reference_dir": ref[0].dir})
    return rows


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dir", nargs="?", default=str(REPO / "benchmarks" / "results" / "sweeps" / "meca-cifar10"))
    ap.add_argument("--defense", default="meca-paper", help="the defense label of the MeCa runs (default meca-paper)")
    ap.add_argument("--sizes", type=int, nargs="*", default=[5000], help="reference subset sizes to train too")
    ap.add_argument("--only", nargs="*", metavar="ROW", help="only these rows (labels of the other axes, e.g. badnet)")
    add_results_args(ap, "meca_kept_size.json")
    args = ap.parse_args(argv)

    sweep_dir = Path(args.sweep_dir)
    rows_in = [r for r in sweep_rows(sweep_dir, args.defense) if not args.only or r["row"] in args.only]
    if not rows_in:
        raise SystemExit(f"{sweep_dir}: no finished run with defense={args.defense} and a finished no-defense "
                         f"run of the same row; run the sweep first")
    out = Path(args.out)
    saved = read_json(out, {"benchmark": "meca_kept_size", "plain": [], "tables": []})

    def acc_at(reference_dir: Path, size: int) -> float:
        base = plain_recipe(reference_dir)
        entry = next((p for p in saved["plain"] if p["recipe"] == base), None)
        if entry is None:
            entry = {"recipe": base, "acc_by_size": {}}
            saved["plain"].append(entry)
        key = str(size)
        if key not in entry["acc_by_size"] or args.recompute:
            recipe = json.loads(json.dumps(base))
            recipe["dataset"]["train_size"] = size
            recipe["name"] = f"kept-size-n{size}"
            print(f"plain training on a random class-balanced subset of {size} ...", file=sys.stderr, flush=True)
            m = run_recipe(recipe, out.parent / "runs" / recipe["name"], progress=True)
            entry["acc_by_size"][key] = 100 * m["clean_acc"]
            write_json(out, saved)
        return entry["acc_by_size"][key]

    rows = []
    for r in rows_in:
        m = json.loads((r["run_dir"] / "metrics.json").read_text())
        acc_none = 100 * json.loads((r["reference_dir"] / "metrics.json").read_text())["clean_acc"]
        acc_meca = 100 * m["defense_metrics"]["clean_model"]["clean_acc"]
        shares = kept_class_shares(r["run_dir"])
        acc_random = acc_at(r["reference_dir"], shares["kept"])
        rows.append({"row": r["row"], "kept": shares["kept"], "min_share": shares["min_class_share"],
                     "max_share": shares["max_class_share"], "acc_none": acc_none, "acc_meca": acc_meca,
                     "acc_random": acc_random, "cost_size": acc_none - acc_random,
                     "cost_choice": acc_random - acc_meca})
    refs = [{"row": f"(random {s})", "kept": s, "acc_random": acc_at(rows_in[0]["reference_dir"], s)}
            for s in args.sizes]
    shown = sweep_dir.resolve()
    shown = shown.relative_to(REPO) if shown.is_relative_to(REPO) else shown
    key = {"sweep": str(shown), "defense": args.defense, "only": sorted(args.only) if args.only else None}
    saved["tables"] = [t for t in saved["tables"] if t["key"] != key] + [{"key": key, "rows": rows + refs}]
    write_json(out, saved)
    print(f"\nMeCa's kept set vs a random clean subset of the same size ({shown}, defense={args.defense})")
    print_table(rows + refs, [("row", "row", "{}"), ("kept", "kept", "{}"),
                              ("min_share", "min class %", "{:.1f}"), ("max_share", "max class %", "{:.1f}"),
                              ("acc_none", "ACC none", "{:.2f}"), ("acc_random", "ACC random |kept|", "{:.2f}"),
                              ("acc_meca", "ACC MeCa", "{:.2f}"), ("cost_size", "size cost", "{:.2f}"),
                              ("cost_choice", "choice cost", "{:.2f}")])
    return rows


if __name__ == "__main__":
    main()
