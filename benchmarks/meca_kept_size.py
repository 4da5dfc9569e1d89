"""How much of MeCa's clean-accuracy loss is the size of the kept set, and how much is which
samples it keeps?

MeCa trains its clean model from scratch on the samples the enhanced model misclassifies (the
kept set). For each row of ``results/meca_cifar10.json`` (one configuration, the defaults unless
``--meca`` is given as there) this trains the same plain recipe (no attack, no defense) on a
random class-balanced CIFAR-10 subset of the *same size* as the kept set, and prints it beside
MeCa's clean-model ACC and the kept set's class balance. Reference sizes (``--sizes``; default
5,000, the half of the data MeCa's alpha_max = 0.5 partition treats as clean) are trained too.

- ACC(random subset of size |kept|) - ACC(MeCa clean model) is what the choice of samples costs
  (hard, atypical or class-skewed samples, and any poison kept);
- ACC(no defense, 10,000) - ACC(random subset of size |kept|) is what the size alone costs.

Plain trainings are kept in ``results/meca_kept_size.json`` by size (``--recompute`` redoes them),
with the printed table per MeCa configuration. Reading the kept sets needs the MeCa run
directories of ``meca_cifar10.py`` (``benchmarks/results/runs/``).

    python benchmarks/meca_kept_size.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (REPO, add_meca_table_args, add_results_args, cifar10_tree, cpu_recipe,  # noqa: E402
                     meca_table_config, print_table, read_json, run_recipe, write_json)


def kept_class_shares(run_dir: Path) -> dict:
    """Class shares (%) of a MeCa run's kept set: the training samples not in ``suspected.json``."""
    import torch

    from bdframe.scan import load_run

    train = load_run(run_dir, device=torch.device("cpu"))[0].poisoned
    flagged = torch.as_tensor(json.loads((run_dir / "suspected.json").read_text())["suspected_ids"],
                              dtype=torch.int64)
    kept = ~train.contains(flagged)
    counts = torch.bincount(train.labels[kept], minlength=int(train.labels.max()) + 1).double()
    shares = 100 * counts / counts.sum()
    return {"kept": int(kept.sum()), "min_class_share": float(shares.min()), "max_class_share": float(shares.max())}


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_meca_table_args(ap)
    ap.add_argument("--sizes", type=int, nargs="*", default=[5000], help="reference subset sizes to train too")
    ap.add_argument("--table", default=str(REPO / "benchmarks" / "results" / "meca_cifar10.json"),
                    help="meca_cifar10.py's results file")
    add_results_args(ap, "meca_kept_size.json")
    args = ap.parse_args(argv)

    config, meca = meca_table_config(args)
    table = read_json(Path(args.table), {"configs": []})
    entry = next((c for c in table["configs"] if c["config"] == config), None)
    if entry is None or not entry["rows"]:
        raise SystemExit(f"{args.table}: no rows for the configuration {config}; run meca_cifar10.py first")
    out = Path(args.out)
    saved = read_json(out, {"benchmark": "meca_kept_size", "configs": []})
    plain_key = {k: getattr(args, k) for k in ("epochs", "width", "seed")}
    plain = next((p for p in saved["configs"] if p["config"] == plain_key), None)
    if plain is None:
        plain = {"config": plain_key, "acc_by_size": {}}
        saved["configs"].append(plain)
    root = cifar10_tree(args.data)

    def acc_at(size: int) -> float:
        key = str(size)
        if key not in plain["acc_by_size"] or args.recompute:
            recipe = dict(cpu_recipe(root, train_size=size, epochs=args.epochs, width=args.width,
                                     device=args.device, seed=args.seed), name=f"kept-size-n{size}")
            print(f"plain training on a random class-balanced subset of {size} ...", file=sys.stderr, flush=True)
            m = run_recipe(recipe, out.parent / "runs" / recipe["name"], progress=True)
            plain["acc_by_size"][key] = 100 * m["clean_acc"]
            write_json(out, saved)
        return plain["acc_by_size"][key]

    rows = []
    for name, r in entry["rows"].items():
        shares = kept_class_shares(Path(r["run_dirs"][1]))
        acc_random = acc_at(shares["kept"])
        rows.append({"attack": name, "kept": shares["kept"], "min_share": shares["min_class_share"],
                     "max_share": shares["max_class_share"], "acc_none": r["acc_none"], "acc_meca": r["acc_meca"],
                     "acc_random": acc_random, "cost_size": r["acc_none"] - acc_random,
                     "cost_choice": acc_random - r["acc_meca"]})
    refs = [{"attack": f"(random {s})", "kept": s, "acc_random": acc_at(s)} for s in args.sizes]
    tables = saved.setdefault("tables", [])
    tables[:] = [t for t in tables if t["config"] != config] + [{"config": config, "rows": rows + refs}]
    write_json(out, saved)
    print(f"\nMeCa's kept set vs a random clean subset of the same size (CIFAR-10, simple-cnn width {args.width}, "
          f"{args.epochs} epochs; MeCa options {meca})")
    print_table(rows + refs, [("attack", "attack", "{}"), ("kept", "kept", "{}"),
                              ("min_share", "min class %", "{:.1f}"), ("max_share", "max class %", "{:.1f}"),
                              ("acc_none", "ACC none (10k)", "{:.2f}"), ("acc_random", "ACC random |kept|", "{:.2f}"),
                              ("acc_meca", "ACC MeCa", "{:.2f}"), ("cost_size", "size cost", "{:.2f}"),
                              ("cost_choice", "choice cost", "{:.2f}")])
    return rows


if __name__ == "__main__":
    main()
