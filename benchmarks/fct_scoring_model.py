"""How well DBR's scoring model ranks the poison, epoch by epoch (docs/dbr.md, the FCT split).

DBR scores every training sample by FCT under a scoring model trained for it: a few epochs of
plain training without augmentation, then epochs of the class-separation stage. This script
runs that same step (the ``d-br`` / ``d-st`` plugin's own ``fct_split``, with its settings
given as KEY=VALUE) on the poisoned training set of a finished run, and after every epoch of
both stages (or every ``--every``-th and the last) it scores every sample by FCT and reports the AUROC of the scores against the poison
ids, with the scoring model's clean accuracy and ASR on the test set. The split at the end is the
one the defense would make: the step has d-st's names and so its seeds, and with the row's recipe
on the same machine the last epoch reproduces a ``d-st`` run's split (``d-br`` trains the model it
repairs first, so its scoring model starts from another initialisation).

Ground truth (the poison ids) is read only to compute the AUROC and the split's recall; the test
set only for the accuracy columns. Nothing here feeds back into a defense.

    # the row's poisoned set from any finished run of it (here the no-defense run)
    RUN="benchmarks/results/sweeps/meca-cifar10-50k/runs/attack=badnet,defense=none"
    python benchmarks/fct_scoring_model.py "$RUN"
    python benchmarks/fct_scoring_model.py "$RUN" --every 5 --model bn_lr_scale=1.0 --label "bn shift at the stage's lr"

Rows are kept in ``results/fct_scoring_model.json`` keyed by run, settings and label; an
existing key is reused unless ``--recompute``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_results_args, parse_key_values, print_table, read_json, write_json  # noqa: E402

PREFIX = "dst"  # the step names, and so the seeds, of d-st (whose scoring model is its first model)


def _parts(run_dir: Path, defense: dict, model: dict):
    """The run's poisoned set rebuilt (:func:`bdframe.scan.rebuild_parts`), with the recipe's
    ``[defense]`` replaced by ``defense`` and ``model`` laid over ``[model]``; checked against
    the run's ``metrics.json`` too, since committed benchmark runs keep no ``poison.json``."""
    from bdframe import recipe as rmod
    from bdframe.errors import UserError
    from bdframe.plugins import load_registry
    from bdframe.runs import read_json as read_run_json
    from bdframe.scan import rebuild_parts

    if not (run_dir / "recipe.toml").is_file():
        raise SystemExit(f"{run_dir}: not a run directory (recipe.toml is missing)")
    registry = load_registry()
    data = rmod.parse_toml(run_dir / "recipe.toml")
    data["defense"] = defense
    data["model"] = {**data["model"], **model}
    recipe = rmod.loads_dict(data, registry=registry, source="fct-scoring-model")
    try:
        parts = rebuild_parts(run_dir, recipe, registry)
    except UserError as e:
        raise SystemExit(f"{run_dir}: {e}") from None
    metrics = run_dir / "metrics.json"
    n = read_run_json(metrics).get("num_poison") if metrics.is_file() else None
    if n is not None and n != len(parts.poison_ids):
        raise SystemExit(f"{run_dir}: the rebuilt poisoned set has {len(parts.poison_ids)} poisoned samples, "
                         f"the run had {n}")
    return registry, recipe, parts


def measure(run_dir: Path, params: dict, model_params: dict, device, every: int = 1) -> dict:
    import torch

    from bdframe.detection import auroc
    from bdframe.interfaces import ScoreContext
    from bdframe.metrics import detection
    from bdframe.runner import RunContext
    from bdframe.seeding import derive_seed

    defense = {"name": "d-br", **params}
    registry, recipe, parts = _parts(run_dir, defense, model_params)
    c = recipe.defense.config
    train, truth_ids = parts.poisoned, parts.poison_ids
    truth = train.contains(truth_ids)
    dbr = sys.modules[registry.get("defense", "d-br").__module__]
    trend: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fct-bench-") as tmp:
        ctx = RunContext.for_parts(parts, device, Path(tmp), progress=True)
        models = []
        new_model = ctx.new_model

        def capture(**kw):
            m = new_model(**kw)
            models.append(m)
            return m

        scorer = ctx.component("scorer", "fct", alpha_clean=c.alpha_clean, alpha_poison=c.alpha_poison, **c.fct)
        # the seed fct_split scores with, so the last epoch's scores are the split's
        sctx = ScoreContext(seed=derive_seed(ctx.seed, PREFIX, "fct"), device=ctx.device, batch_size=256,
                            progress=False)
        log = ctx.log

        def on_record(rec: dict) -> None:
            log(rec)
            stage = str(rec.get("stage", ""))
            if "epoch" not in rec or not stage.startswith(f"{PREFIX}-scoring-"):
                return
            last = c.notrans_epochs if stage.endswith("-plain") else c.intra_epochs
            if rec["epoch"] != last and not rec.get("stopped") and rec["epoch"] % every:
                return
            t = time.perf_counter()
            s = scorer.score(models[-1], train, sctx).double().cpu()
            row = {"stage": stage.removeprefix(f"{PREFIX}-scoring-"), "epoch": rec["epoch"],
                   "loss": rec.get("loss"), "loss_floor": rec.get("loss_floor"), "stopped": bool(rec.get("stopped")),
                   "train_acc": rec.get("train_acc"), "auroc": auroc(s, truth),
                   **ctx.evaluate(models[-1]), "score_s": time.perf_counter() - t}
            trend.append(row)
            print(f"{row['stage']} epoch {row['epoch']}: FCT AUROC {row['auroc']:.3f}, clean ACC "
                  f"{100 * row['clean_acc']:.2f}%, ASR {100 * row.get('asr', float('nan')):.2f}%",
                  file=sys.stderr, flush=True)

        ctx.new_model = capture
        ctx.log = on_record
        t = time.perf_counter()
        split = dbr.fct_split(ctx, train, c, PREFIX)
        secs = time.perf_counter() - t
    final = auroc(split["scores"], truth)
    return {"params": params, "model": model_params, "seconds": secs, "trend": trend, "final_auroc": final,
            "suspected_poisoned": detection(split["poisoned"], truth_ids, train.ids),
            "suspected_clean_poison": int(torch.isin(split["clean"], torch.as_tensor(truth_ids)).sum())}


def _run_name(run_dir: Path) -> str:
    """The run directory as the results file names it: relative to the repository where it
    lies inside it (two sweeps have runs of the same name)."""
    from _common import REPO

    path = run_dir.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def main(argv=None) -> dict:
    from bdframe.nn import resolve_device

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="a finished run of the row (any defense): its poisoned set is rebuilt")
    ap.add_argument("params", nargs="*", metavar="KEY=VALUE",
                    help="settings of the FCT split (notrans_epochs, intra_epochs, intra_stop_gap, scoring_lr, alpha_clean, "
                         "alpha_poison, fct); JSON values")
    ap.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE", help="laid over the run's [model]")
    ap.add_argument("--label", default="", help="a name for the variant in the table")
    ap.add_argument("--every", type=int, default=1, metavar="N",
                    help="score after every N-th epoch of each stage and after its last (default 1: every "
                         "epoch; scoring all 50,000 CIFAR-10 images takes minutes on a CPU)")
    ap.add_argument("--device", default="auto")
    add_results_args(ap, "fct_scoring_model.json")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    run_dir = Path(args.run_dir)
    params = parse_key_values(args.params)
    model_params = parse_key_values(args.model, "--model ")
    out = Path(args.out)
    saved = read_json(out, {"benchmark": "fct_scoring_model", "rows": {}})
    key = "|".join([_run_name(run_dir), ",".join(f"{k}={v}" for k, v in sorted(params.items())),
                    ",".join(f"model.{k}={v}" for k, v in sorted(model_params.items())), args.label] + ([f"every {args.every}"] if args.every > 1 else []))
    if key not in saved["rows"] or args.recompute:
        saved["rows"][key] = measure(run_dir, params, model_params, device, max(1, args.every))
        write_json(out, saved)
    row = saved["rows"][key]
    d = row["suspected_poisoned"]
    print(f"\n{key}")
    print_table([dict(r, clean_acc=100 * r["clean_acc"], asr=100 * r["asr"] if r.get("asr") is not None else None)
                 for r in row["trend"]],
                [("stage", "stage", "{}"), ("epoch", "epoch", "{}"), ("loss", "loss", "{:.4f}"),
                 ("loss_floor", "floor", "{:.4f}"),
                 ("train_acc", "train acc", "{:.3f}"), ("clean_acc", "ACC %", "{:.2f}"), ("asr", "ASR %", "{:.2f}"),
                 ("auroc", "FCT AUROC", "{:.3f}")])
    print(f"split: suspected poisoned {d['flagged']} (recall {100 * d['recall']:.1f}%, precision "
          f"{100 * d['precision']:.1f}%); poisoned samples among the suspected clean: {row['suspected_clean_poison']}; "
          f"{row['seconds']:.0f} s")
    return row


if __name__ == "__main__":
    main()
