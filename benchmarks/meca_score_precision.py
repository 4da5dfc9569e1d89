"""MeCa's consistency scoring in float32 and under bfloat16 autocast, on the saved models of
finished MeCa runs: what the faster precision costs in ranking.

For each run directory given (a MeCa run that saved its models), the warm-up and the enhanced
model score the run's training set with ``adv-kl`` (the first iteration's masks) once in
float32 and once under bfloat16 autocast (what ``amp = "on"`` does in the enhancement), one
after the other in this process. Per model it prints the seconds of each pass and their ratio,
the AUROC of each score against the poison ids, the Spearman correlation of the two rankings,
and the overlap of the two top quarters (the set a partition at alpha 0.25 would unlearn).
It also gives the AUROC of the model's ``p(y|x)`` in both precisions. Ground truth
(``poison.json``) is read only to compute the AUROCs.

bfloat16 is fast only on CPUs that compute it natively (``lscpu`` lists ``avx512_bf16`` or
``amx_bf16``); elsewhere the script stops with exit status 2 unless ``--emulated`` is given.

    python benchmarks/meca_score_precision.py "benchmarks/results/sweeps/meca-cifar10/runs/attack=badnet,defense=meca-unlearn-warmup" \\
        --out benchmarks/results/meca_score_precision.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

MODELS = ("warmup", "enhanced")


def spearman(a, b) -> float:
    import torch

    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def read_run(d: Path, batch_size: int) -> list[dict]:
    import torch

    from bdframe.detection import auroc
    from bdframe.interfaces import ScoreContext
    from bdframe.plugins import load_registry
    from bdframe.scan import load_run
    from bdframe.scoring import logits

    parts, _ = load_run(d, device="cpu")
    data = parts.poisoned
    truth = torch.isin(data.ids, torch.as_tensor(parts.poison_ids, dtype=torch.int64))
    scorer = load_registry().create("scorer", "adv-kl", iteration=1)
    rows = []
    for which in MODELS:
        model = parts.build_model()
        model.load_state_dict(torch.load(d / f"meca_{which}_model.pt", map_location="cpu", weights_only=True))
        got = {}
        for prec in ("float32", "bfloat16"):
            ctx = ScoreContext(seed=1, batch_size=batch_size, progress=False)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bfloat16"):
                t0 = time.perf_counter()
                s = scorer.score(model, data, ctx)
                sec = time.perf_counter() - t0
                z = logits(model, data, ctx)
            p = torch.softmax(z.double(), 1)[torch.arange(len(data)), data.labels]
            got[prec] = {"score": s, "seconds": sec, "prob": p}
        a, b = got["float32"]["score"], got["bfloat16"]["score"]
        k = len(a) // 4
        top = len(set(a.topk(k).indices.tolist()) & set(b.topk(k).indices.tolist())) / k
        rows.append({"run": d.parent.parent.name + "/" + d.name, "model": which,
                     "seconds_float32": got["float32"]["seconds"], "seconds_bfloat16": got["bfloat16"]["seconds"],
                     "speedup": got["float32"]["seconds"] / got["bfloat16"]["seconds"],
                     "auroc_float32": auroc(a, truth), "auroc_bfloat16": auroc(b, truth),
                     "spearman": spearman(a, b), "top_quarter_overlap": top,
                     "prob_auroc_float32": auroc(got["float32"]["prob"], truth),
                     "prob_auroc_bfloat16": auroc(got["bfloat16"]["prob"], truth)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", nargs="+", help="finished MeCa run directories of attacked rows (with saved models)")
    ap.add_argument("--batch-size", type=int, default=256, help="scoring batch size (MeCa's default 256)")
    ap.add_argument("--emulated", action="store_true", help="run even where bfloat16 is emulated (slow)")
    ap.add_argument("--out", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    from bdframe.training import cpu_bf16_supported

    if not cpu_bf16_supported() and not args.emulated:
        print("meca_score_precision.py: this CPU has no native bfloat16 (avx512_bf16 or amx_bf16), so bfloat16 "
              "would be emulated and slow; pass --emulated to measure anyway", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print("meca_score_precision.py: --batch-size must be at least 1", file=sys.stderr)
        return 2
    dirs = [Path(d) for d in args.run_dir]
    need = ("poison.json",) + tuple(f"meca_{m}_model.pt" for m in MODELS)
    bad = [str(d) for d in dirs if not all((d / f).is_file() for f in need)]
    if bad:
        print(f"meca_score_precision.py: not a finished MeCa run of an attacked row with saved models "
              f"({', '.join(need)} needed): {', '.join(bad)}", file=sys.stderr)
        return 2
    rows = [r for d in dirs for r in read_run(d, args.batch_size)]
    print_table(rows, [("run", "run", "{}"), ("model", "model", "{}"),
                       ("seconds_float32", "s float32", "{:.1f}"), ("seconds_bfloat16", "s bfloat16", "{:.1f}"),
                       ("speedup", "speed-up", "{:.2f}x"), ("auroc_float32", "AUROC float32", "{:.4f}"),
                       ("auroc_bfloat16", "AUROC bfloat16", "{:.4f}"), ("spearman", "Spearman", "{:.4f}"),
                       ("top_quarter_overlap", "top-quarter overlap", "{:.3f}"),
                       ("prob_auroc_float32", "p(y|x) AUROC float32", "{:.4f}"),
                       ("prob_auroc_bfloat16", "p(y|x) AUROC bfloat16", "{:.4f}")])
    if args.out:
        write_json(Path(args.out), {"batch_size": args.batch_size, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
