"""MeCa's defaults on every row measured: one table from finished runs and replays, against the targets.

MeCa's defaults were measured two ways on all 50,000 CIFAR-10 images: end to end (a sweep column
whose settings are the defaults, e.g. ``meca-relearn-train``) and, on rows whose MeCa run had
already trained the clean model under the same detection, by replaying the second look and the
relearning from that run's saved clean model (``benchmarks/meca_second_look.py``; a replay gives
the end-to-end run's figures to the last digit where both were made). This script reads both,
finds each row's no-defense run beside it in the same sweep (``attack=<row>,defense=none``) and
prints one table with the targets the defaults are held to:

- ACC within 3 points of the no-defense run;
- ASR at most 2% where the warm-up model learned the backdoor (its ASR at least 50%);
- recall at least 95% at precision at least 60% where the warm-up learned it.

Nothing here trains or evaluates a model; it reads ``metrics.json``, ``recipe.toml`` and
``history.jsonl`` (the class the class test picked) of the runs, and the replay JSON rows:

    R=benchmarks/results/sweeps/meca-cifar10-50k/runs; H=benchmarks/results/sweeps/meca-defaults-heldout-50k/runs
    python benchmarks/meca_defaults_table.py --runs "$R"/*,defense=meca-relearn-train "$H"/*,defense=meca-relearn-train \\
        --replays benchmarks/results/meca_second_look_50k/relearn-train.json --variant "balance=True" \\
        --out benchmarks/results/meca_defaults_50k.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import meca_detect_record, print_table, write_json  # noqa: E402

LEARNED = 0.5  # a warm-up ASR at least this: the backdoor was learned, so the ASR and detection targets apply


def _refuse(message: str):
    print(f"meca_defaults_table.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _attack_key(run_dir: Path) -> str:
    return run_dir.name.split(",")[0].split("=", 1)[1]


def _column(run_dir: Path) -> str:
    return run_dir.name.rsplit("defense=", 1)[-1]


def _picked(run_dir: Path) -> list[int] | None:
    rec = meca_detect_record(run_dir)
    return None if rec is None else list(rec.get("suspicious_classes") or [])


def _row_base(run_dir: Path) -> dict:
    """What the run and its no-defense sibling say: the target, the no-defense and warm-up figures."""
    import toml

    for f in ("metrics.json", "recipe.toml", "history.jsonl"):
        if not (run_dir / f).is_file():
            _refuse(f"{run_dir}: {f} is missing (a finished MeCa run is needed)")
    recipe = toml.load(run_dir / "recipe.toml")
    m = json.loads((run_dir / "metrics.json").read_text())
    if m.get("defense") != "meca":
        _refuse(f"{run_dir}: not a MeCa run (defense {m.get('defense')!r})")
    key = _attack_key(run_dir)
    none_dir = run_dir.parent / f"attack={key},defense=none"
    if not (none_dir / "metrics.json").is_file():
        _refuse(f"{run_dir}: its no-defense run {none_dir.name} is missing beside it")
    none = json.loads((none_dir / "metrics.json").read_text())
    warm = m["defense_metrics"]["trend"][0]
    attack = recipe.get("attack") or {}
    return {"row": key, "sweep": run_dir.parent.parent.name, "target": attack.get("target"),
            "none_acc_pct": 100 * none["clean_acc"], "none_asr_pct": None if none.get("asr") is None else 100 * none["asr"],
            "warmup_acc_pct": 100 * warm["clean_acc"], "warmup_asr_pct": None if warm.get("asr") is None else 100 * warm["asr"],
            "picked": _picked(run_dir), "train_size": m["train_size"], "run": str(run_dir)}


def _targets(r: dict) -> dict:
    r["acc_change"] = r["acc_pct"] - r["none_acc_pct"]
    learned = r["warmup_asr_pct"] is not None and r["warmup_asr_pct"] >= 100 * LEARNED
    r["acc_met"] = r["acc_change"] >= -3.0
    r["asr_met"] = (r["asr_pct"] <= 2.0) if learned else None
    r["detection_met"] = (r["recall_pct"] >= 95.0 and r["precision_pct"] >= 60.0) if learned else None
    return r


def from_run(run_dir: Path) -> dict:
    r = _row_base(run_dir)
    m = json.loads((run_dir / "metrics.json").read_text())
    det = m.get("detection") or {}
    r.update(source=f"run: {_column(run_dir)}", acc_pct=100 * m["clean_acc"], asr_pct=None if m.get("asr") is None else 100 * m["asr"],
             flagged=det.get("flagged", m["suspected"]["count"]),
             recall_pct=100 * det["recall"] if det.get("recall") is not None else None,
             precision_pct=100 * det["precision"] if det.get("precision") is not None else None,
             seconds=m["seconds"]["total"])
    return r


def from_replay(row: dict) -> dict:
    r = _row_base(Path(row["run"]))
    r.update(source=f"replay: {_column(Path(row['run']))}", acc_pct=row["acc_pct"], asr_pct=row["asr_pct"], flagged=row["flagged"],
             recall_pct=row["recall_pct"], precision_pct=row["precision_pct"], seconds=None, variant=row["variant"])
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="*", default=[],
                    help="finished MeCa runs made with the defaults (where two are given for a row, the first is kept)")
    ap.add_argument("--replays", nargs="*", default=[], help="JSON files written by benchmarks/meca_second_look.py")
    ap.add_argument("--variant", default="", help="the replay variant that is the defaults (its name ends with this)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.replays and not args.variant:
        ap.error("--variant is needed with --replays (which of each run's replayed variants is the defaults)")
    rows, seen = [], set()
    for d in args.runs:
        r = _targets(from_run(Path(d)))
        if (r["sweep"], r["row"]) in seen:  # the first run given for a row is kept
            continue
        rows.append(r)
        seen.add((r["sweep"], r["row"]))
    for f in args.replays:
        for row in json.loads(Path(f).read_text())["rows"]:
            if not row["variant"].endswith(args.variant):
                continue
            r = _targets(from_replay(row))
            if (r["sweep"], r["row"]) in seen:  # an end-to-end run of the defaults is the better record
                continue
            rows.append(r)
            seen.add((r["sweep"], r["row"]))
    if not rows:
        _refuse("no rows: give --runs and/or --replays (with a --variant that matches)")
    rows.sort(key=lambda r: (r["sweep"], r["row"]))
    mark = {True: "yes", False: "NO", None: "-"}
    for r in rows:
        r["picked_s"] = ",".join(map(str, r["picked"])) if r["picked"] else "none"
        r["flagged_pct"] = 100 * r["flagged"] / r["train_size"]
        for k in ("acc_met", "asr_met", "detection_met"):
            r[k + "_s"] = mark[r[k]]
    print_table(rows, [("sweep", "sweep", "{}"), ("row", "row", "{}"), ("target", "target", "{}"),
                       ("source", "source", "{}"), ("none_acc_pct", "none ACC", "{:.2f}"),
                       ("none_asr_pct", "none ASR", "{:.2f}"), ("warmup_asr_pct", "warm-up ASR", "{:.2f}"),
                       ("acc_pct", "ACC", "{:.2f}"), ("asr_pct", "ASR", "{:.2f}"), ("acc_change", "change", "{:+.2f}"),
                       ("picked_s", "class", "{}"), ("flagged_pct", "flagged %", "{:.2f}"),
                       ("recall_pct", "recall", "{:.2f}"), ("precision_pct", "precision", "{:.2f}"),
                       ("acc_met_s", "ACC<=3", "{}"), ("asr_met_s", "ASR<=2", "{}"), ("detection_met_s", "R95/P60", "{}")])
    for k, name in (("acc_met", "ACC within 3 points"), ("asr_met", "ASR <= 2%"), ("detection_met", "recall >= 95% at precision >= 60%")):
        judged = [r for r in rows if r[k] is not None]
        print(f"{name}: met on {sum(bool(r[k]) for r in judged)} of {len(judged)} rows it applies to")
    if args.out:
        for r in rows:
            for k in ("picked_s", "acc_met_s", "asr_met_s", "detection_met_s"):
                r.pop(k)
        write_json(args.out, {"learned_warmup_asr": LEARNED, "rows": rows})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
