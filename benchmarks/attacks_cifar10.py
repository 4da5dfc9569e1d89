"""The eight attacks at 5% poison, no defense, on real CIFAR-10 (issue: the attack suite).

Each row trains the CPU-sized configuration of ``badnet_cifar10.py`` (simple-cnn, a
class-balanced subset of the training images, the full 10,000-image test set) on the
poisoned data and reports clean ACC, ASR (on the attack's own poisoned test set) and wall
time. Rows already in the JSON are kept; ``--recompute`` redoes them, ``--only`` picks rows.

    python benchmarks/attacks_cifar10.py                    # all rows, about 8 minutes each on 2 CPU cores
    python benchmarks/attacks_cifar10.py --only wanet tact  # single rows
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (add_cpu_recipe_args, add_results_args, cifar10_tree, cpu_recipe, print_table,  # noqa: E402
                     read_json, run_recipe, write_json)

ROWS = ["none", "badnet", "blend", "sig", "wanet", "physicalba", "tact", "adaptive-blend", "adaptive-patch"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cpu_recipe_args(ap, train_size=20000)
    ap.add_argument("--only", nargs="+", choices=ROWS, help="rows to run (default: all)")
    add_results_args(ap, "attacks_cifar10.json")
    ap.add_argument("--variant", action="append", default=[], metavar="ATTACK:KEY=VALUE[,KEY=VALUE]",
                    help="an extra row with changed attack parameters, e.g. wanet:s=1.0 (diagnostics)")
    args = ap.parse_args(argv)

    out = Path(args.out)
    config = {k: getattr(args, k) for k in ("train_size", "epochs", "width", "poison_rate", "seed")}
    saved = read_json(out, {})
    rows = saved.get("rows", {}) if saved.get("config") == config else {}
    root = cifar10_tree(args.data)
    todo = [(n, n, {}) for n in (args.only or ROWS)]
    for v in args.variant:
        attack, _, kv = v.partition(":")
        params = {k: json.loads(x) for k, _, x in (p.partition("=") for p in kv.split(",") if p)}
        todo.append((f"{attack} {kv}", attack, params))
    for name, attack_name, params in todo:
        if name in rows and not args.recompute:
            print(f"{name}: kept from {out.name} (use --recompute to redo)", file=sys.stderr)
            continue
        recipe = cpu_recipe(root, train_size=args.train_size, epochs=args.epochs, width=args.width,
                            device=args.device, seed=args.seed)
        recipe["name"] = "attack-bench-" + name.replace(" ", "-").replace(",", "-").replace("=", "")
        if attack_name != "none":
            recipe["attack"] = {"name": attack_name, "poison_rate": args.poison_rate, **params}
        print(f"running {name} ...", file=sys.stderr, flush=True)
        m = run_recipe(recipe, out.parent / "runs" / recipe["name"], progress=True)
        rows[name] = {"attack": name, "clean_acc": 100 * m["clean_acc"], "asr": 100 * m["asr"] if "asr" in m else None,
                      "asr_set_size": m.get("asr_set_size"), "num_poison": m["num_poison"], "num_cover": m["num_cover"],
                      "wall_s": m["wall_seconds"], "images_per_s": m["train_images_per_s"],
                      "non_compute_pct": 100 * m["train_non_compute_share"], "train_size": m["train_size"],
                      "test_size": m["test_size"], "run_dir": m["run_dir"]}
        write_json(out, {"benchmark": "attacks_cifar10", "config": config, "rows": rows})
    base = rows.get("none", {}).get("clean_acc")
    table = []
    for name in ROWS + sorted(k for k in rows if k not in ROWS):
        if name in rows:
            r = dict(rows[name])
            r["acc_drop"] = (base - r["clean_acc"]) if base is not None else None
            table.append(r)
    print(f"\nAttacks at {100 * args.poison_rate:g}% on CIFAR-10 (train {args.train_size}, test 10,000), no defense, "
          f"simple-cnn width {args.width}, {args.epochs} epochs")
    print_table(table, [("attack", "attack", "{}"), ("clean_acc", "clean ACC %", "{:.2f}"),
                        ("acc_drop", "drop vs none", "{:+.2f}"), ("asr", "ASR %", "{:.2f}"),
                        ("asr_set_size", "ASR set", "{}"), ("num_poison", "poison", "{}"), ("num_cover", "cover", "{}"),
                        ("wall_s", "wall s", "{:.0f}")])
    return rows


if __name__ == "__main__":
    main()
