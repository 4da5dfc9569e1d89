"""Clean ACC and ASR of each model a finished MeCa run trained, read from its ``history.jsonl``.

MeCa trains up to four models one after the other: the warm-up model (standard training on all
of the data), the enhanced model (after the last enhancement iteration), the clean model
(trained on what detection kept) and, with relearning, the relearned model. A backdoor that the
enhancement weakens is one detection can no longer find, so the enhanced model's ASR beside the
warm-up's says whether the enhancement held the backdoor. This script prints, per run directory
given, those figures and the detection's kept and flagged counts. Nothing is retrained; the
figures are the ones the run logged (the test set, for reporting only).

    python benchmarks/meca_stages.py benchmarks/results/sweeps/meca-cifar10-50k/runs/*defense=meca* \\
        --out benchmarks/results/meca_stages_50k.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

# history.jsonl stage -> column prefix; the enhancement's last iteration is found by its number
STAGES = {"meca-warmup": "warmup", "meca-clean": "clean", "meca-relearn": "relearn"}


def pct(v):
    return None if v is None else 100.0 * v


class BadRun(Exception):
    pass


def read_run(d: Path) -> dict:
    """The run's per-model figures (in %) and detection counts, from its ``history.jsonl``."""
    hist = d / "history.jsonl"
    if not hist.is_file():
        raise BadRun(f"{d}: no history.jsonl (not a run directory, or the run has not started)")
    row = {"run": f"{d.parent.parent.name}/{d.name}"}  # sweep/run
    last_iter = -1
    for line in hist.read_text().splitlines():
        rec = json.loads(line)
        stage = rec.get("stage", "")
        if "epoch" in rec:  # per-epoch training records
            continue
        if stage in STAGES:
            row[STAGES[stage] + "_acc"] = pct(rec.get("clean_acc"))
            row[STAGES[stage] + "_asr"] = pct(rec.get("asr"))
        elif stage.startswith("meca-iter-") and rec.get("meca_iteration", -1) > last_iter:
            last_iter = rec["meca_iteration"]
            if rec.get("clean_acc") is not None:
                row["enhanced_acc"] = pct(rec.get("clean_acc"))
                row["enhanced_asr"] = pct(rec.get("asr"))
        elif stage == "meca-detect":
            row["kept"] = rec.get("detected_clean")
            row["flagged"] = rec.get("detected_poison")
            row["classes"] = ", ".join(map(str, rec.get("suspicious_classes") or [])) or None
    if "warmup_acc" not in row:
        raise BadRun(f"{d}: history.jsonl has no MeCa warm-up record (not a finished MeCa run?)")
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished MeCa run directories")
    ap.add_argument("--out", type=Path, help="also write the rows as JSON to this file")
    args = ap.parse_args(argv)
    try:
        rows = [read_run(d) for d in args.runs]
    except BadRun as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_table(rows, [("run", "run", "{}"), ("warmup_acc", "warm-up ACC", "{:.2f}"),
                       ("warmup_asr", "warm-up ASR", "{:.2f}"), ("enhanced_acc", "enhanced ACC", "{:.2f}"),
                       ("enhanced_asr", "enhanced ASR", "{:.2f}"), ("kept", "kept", "{}"),
                       ("flagged", "flagged", "{}"), ("classes", "classes picked", "{}"),
                       ("clean_acc", "clean ACC", "{:.2f}"), ("clean_asr", "clean ASR", "{:.2f}"),
                       ("relearn_acc", "relearned ACC", "{:.2f}"), ("relearn_asr", "relearned ASR", "{:.2f}")])
    if args.out:
        write_json(args.out, rows)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
