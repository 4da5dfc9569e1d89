"""DBD's rows of a sweep with what explains them: the linear probe, the split, where the time goes.

``bdframe report`` gives clean ACC, ASR, detection and the time multiple. A DBD result is read
through its linear probe: the clean accuracy a linear head reaches on the frozen
self-supervised backbone says what that backbone learned, and the semi-supervised stage starts
from it. Per attack row of a sweep directory this prints, for the no-defense column (``--none``,
default ``none``) and the DBD column (``--dbd``, default ``dbd``):

- the no-defense run's ACC / ASR;
- DBD's linear probe ACC / ASR and its result after semi-supervised fine-tuning;
- the low-credible set of the final model: recall, precision and the AUROC of the symmetric
  cross-entropy that ranks it (where the run knows the attack);
- the low-credible samples of each given label (from the run's ``suspected.csv``) and the label
  with the most of them: where the split keeps the labels of the whole set's lowest-loss share,
  a class the backbone separates poorly can lose nearly all of its labels;
- the seconds of the three stages (self-supervised, linear probe, semi-supervised), the run's
  total, and the multiple ``DBD total / no-defense total``, given only when both runs record
  the same CPU, device and thread count in ``run.json``;
- with ``--trend``, the clean ACC and ASR after every linear-probe and semi-supervised epoch,
  from the run's ``history.jsonl`` (runs with ``evaluate_each_epoch``; reporting only).

    bdframe sweep run benchmarks/sweeps/dbd-cifar10-fast.toml --jobs 1
    python benchmarks/dbd_rows.py benchmarks/results/sweeps/dbd-cifar10-fast

The figures are written to ``results/dbd_rows.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, print_table, sweep_dir_problem, write_json  # noqa: E402


def _pct(x):
    return None if x is None else round(100.0 * x, 2)


def trend_of(run_dir: Path) -> list[dict]:
    """``{"stage", "epoch", "clean_acc", "asr"}`` (in %) after every evaluated epoch of the
    linear-probe and semi-supervised stages of a DBD run."""
    import json

    path = run_dir / "history.jsonl"
    out = []
    for line in (path.read_text().splitlines() if path.is_file() else []):
        r = json.loads(line)
        if r.get("stage") in ("dbd-linear", "dbd-semi") and "epoch" in r and "clean_acc" in r:
            out.append({"stage": r["stage"].removeprefix("dbd-"), "epoch": r["epoch"],
                        "clean_acc": _pct(r["clean_acc"]), "asr": _pct(r.get("asr"))})
    return out


def low_credible_by_class(run_dir: Path) -> dict:
    """``{class name: number of low-credible samples with that given label}`` from the run's
    ``suspected.csv`` (empty when the run did not write one)."""
    import collections
    import csv

    path = run_dir / "suspected.csv"
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        counts = collections.Counter(r.get("class") or r["label"] for r in csv.DictReader(f))
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def rows_of(sweep: Path, none_label: str, dbd_label: str) -> list[dict]:
    """One dict per attack row that has a finished DBD run."""
    from bdframe.report import FINISHED, hardware, load_runs

    _, axes, runs = load_runs(sweep)
    finished = {(r.labels["attack"], r.labels["defense"]): r for r in runs if r.status == FINISHED}
    rows = []
    for attack in axes["attack"]:
        dbd, none = finished.get((attack, dbd_label)), finished.get((attack, none_label))
        if dbd is None:
            continue
        m = dbd.metrics
        dm = m["defense_metrics"]
        stages = dm["stages"]
        det = m.get("detection") or {}
        row = {"attack": attack,
               "probe_acc": _pct(stages["linear"]["clean_acc"]), "probe_asr": _pct(stages["linear"].get("asr")),
               "dbd_acc": _pct(m["clean_acc"]), "dbd_asr": _pct(m.get("asr")),
               "recall": _pct(det.get("recall")), "precision": _pct(det.get("precision")), "auroc": det.get("auroc"),
               "simclr_s": dm["stage_seconds"]["simclr"], "linear_s": dm["stage_seconds"]["linear"],
               "semi_s": dm["stage_seconds"]["semi"], "dbd_total_s": m["seconds"]["total"],
               "dbd_cpu": (dbd.environment or {}).get("cpu"), "trend": trend_of(dbd.dir)}
        by_class = low_credible_by_class(dbd.dir)
        row["low_credible_by_class"] = by_class
        row["most_low_credible"] = (f"{next(iter(by_class))} {next(iter(by_class.values()))}"
                                    if by_class else None)
        if none is not None:
            row.update(none_acc=_pct(none.metrics["clean_acc"]), none_asr=_pct(none.metrics.get("asr")),
                       none_total_s=none.metrics["seconds"]["total"])
            same = hardware(dbd) is not None and hardware(dbd) == hardware(none) and not (dbd.resumed or none.resumed)
            row["multiple"] = m["seconds"]["total"] / none.metrics["seconds"]["total"] if same else None
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir", help="a sweep directory written by `bdframe sweep run`")
    ap.add_argument("--none", default="none", help="label of the no-defense column (default: none)")
    ap.add_argument("--dbd", default="dbd", help="label of the DBD column (default: dbd)")
    ap.add_argument("--trend", action="store_true",
                    help="also print ACC / ASR after every linear-probe and semi-supervised epoch")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "dbd_rows.json"))
    args = ap.parse_args(argv)
    sweep = Path(args.sweep_dir)
    problem = sweep_dir_problem(sweep, "dbd_rows.py") or (
        None if (rows := rows_of(sweep, args.none, args.dbd)) else
        f"dbd_rows.py: no finished {args.dbd!r} run in {str(sweep)!r}")
    if problem:
        print(problem, file=sys.stderr)
        return 2
    print_table(rows, [("attack", "attack", "{}"), ("none_acc", "none ACC", "{:.2f}"), ("none_asr", "none ASR", "{:.2f}"),
                       ("probe_acc", "probe ACC", "{:.2f}"), ("probe_asr", "probe ASR", "{:.2f}"),
                       ("dbd_acc", "DBD ACC", "{:.2f}"), ("dbd_asr", "DBD ASR", "{:.2f}"),
                       ("recall", "recall", "{:.1f}"), ("precision", "precision", "{:.1f}"), ("auroc", "AUROC", "{:.3f}"),
                       ("most_low_credible", "most low-credible label", "{}"), ("simclr_s", "SSL s", "{:.0f}"), ("linear_s", "probe s", "{:.0f}"), ("semi_s", "semi s", "{:.0f}"),
                       ("dbd_total_s", "total s", "{:.0f}"), ("none_total_s", "none s", "{:.0f}"),
                       ("multiple", "x", "{:.2f}")])
    print("ACC / ASR in %; probe: the linear head on the frozen self-supervised backbone; recall / precision of "
          "the low-credible set; AUROC of the symmetric cross-entropy that ranks it; most low-credible label: the "
          "given label with the most low-credible samples, and their number; x: DBD's total seconds over "
          "the no-defense run's (only where both ran on the same CPU and thread count)")
    for row in rows if args.trend else []:
        if row["trend"]:
            print(f"\n{row['attack']}: ACC / ASR after every epoch")
            print_table(row["trend"], [("stage", "stage", "{}"), ("epoch", "epoch", "{}"),
                                       ("clean_acc", "ACC", "{:.2f}"), ("asr", "ASR", "{:.2f}")])
    write_json(Path(args.out), {"benchmark": "dbd_rows", "sweep": str(sweep), "none": args.none, "dbd": args.dbd,
                                "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
