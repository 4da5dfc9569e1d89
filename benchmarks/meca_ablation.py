"""Ablations of MeCa's reconstructed choices (docs/meca.md), starting from a finished MeCa run's warm-up model.

Every variant starts from the same warm-up model (MeCa's 10 warm-up epochs on the run's poisoned
set): ``meca_warmup_model.pt`` in the run directory (MeCa saves it with ``save_models``), or else
it is trained once here with the run's recipe and cached beside the run as
``<run_dir>.warmup.pt``. A variant then costs only what it changes:

- ``adv-kl``: AUROC and TPR at 5% FPR of the adv-kl consistency score on the warm-up model (the
  score MeCa's first partition uses) for a set of scorer settings (epsilon, mask, gradient loss).
- ``after``: MeCa's detection, clean training and relearning with changed options (e.g.
  ``class_test='"both"' clean_unlearn=1.0``), starting from the run's own warm-up and enhanced
  models (``meca_warmup_model.pt`` and ``meca_enhanced_model.pt``; the run's recipe otherwise
  unchanged, full clean training included): the final model's ACC/ASR beside the run's, and the
  detected split's recall, precision and flagged share.
- ``enhance``: MeCa's backdoor enhancement and detection with changed options (e.g. ``lam=0.3``):
  the enhanced model's ACC/ASR per iteration, the detected split's recall, precision and flagged
  share against the ground truth, and the AUROC of each iteration's consistency score. The clean
  retraining is cut to one epoch (it is not what is measured here).

Ground truth (poison ids) is read only to compute the metrics. Results are appended to
``results/meca_ablation.json`` keyed by run and variant; existing keys are kept unless
``--recompute``.

    RUN=benchmarks/results/sweeps/meca-cifar10/runs/attack=badnet,defense=meca-paper
    python benchmarks/meca_ablation.py adv-kl  $RUN
    python benchmarks/meca_ablation.py enhance $RUN lam=0.3
    python benchmarks/meca_ablation.py after $RUN clean_unlearn=1.0
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import attrs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_results_args, parse_key_values, print_table, read_json, write_json  # noqa: E402

E = 1 / 255
ADV_KL_GRID = [("grid eps 1/255", {"epsilon": 1 * E}), ("grid eps 2/255", {"epsilon": 2 * E}),
               ("grid eps 4/255", {"epsilon": 4 * E}), ("grid eps 8/255 (default)", {"epsilon": 8 * E}),
               ("grid eps 16/255", {"epsilon": 16 * E}), ("grid eps 32/255", {"epsilon": 32 * E}),
               ("grid keep 0.25 eps 4/255", {"epsilon": 4 * E, "keep_prob": 0.25}),
               ("grid keep 1.0 eps 8/255", {"epsilon": 8 * E, "keep_prob": 1.0}),
               ("grid ce_pred eps 8/255", {"epsilon": 8 * E, "grad_loss": "ce_pred"}),
               ("single eps 8/255", {"epsilon": 8 * E, "mask_mode": "single"}),
               ("single eps 32/255", {"epsilon": 32 * E, "mask_mode": "single"})]


def _meca_recipe(run_dir: Path, registry, *, full: bool = False, **params):
    """The run's recipe with MeCa's options changed (clean retraining cut to one epoch and no
    relearning, unless ``full``)."""
    from bdframe import recipe as rmod

    data = rmod.parse_toml(run_dir / "recipe.toml")
    if data.get("defense", {}).get("name") != "meca":
        raise SystemExit(f"{run_dir}: not a MeCa run (its recipe's defense is not meca)")
    cut = {} if full else {"relearn": False}
    data["defense"] = {**data["defense"], **cut, "evaluate_each_epoch": False, "save_models": False, **params}
    if not full:
        data["train"] = {**data["train"], "epochs": 1}
    return rmod.loads_dict(data, registry=registry, source="ablation")


def _run_meca(run_dir: Path, device, params: dict, warmup: Path | None, enhanced: Path | None = None) -> dict:
    """Run the MeCa defense on the run's poisoned set in a scratch directory, starting from the
    warm-up state ``warmup`` if given, and from the enhanced model ``enhanced`` (a state dict:
    the enhancement is then skipped, clean training and relearning run in full) if given.
    Returns the defense result, the ``meca_scores.pt`` contents, the seconds, the warm-up state,
    and the poisoned set with its poison ids."""
    import torch

    from bdframe.runner import RunContext
    from bdframe.scan import load_run

    saved, _ = load_run(run_dir, device=device)
    registry, train, poison_ids = saved.registry, saved.poisoned, saved.poison_ids
    recipe = _meca_recipe(run_dir, registry, full=enhanced is not None, **params)
    parts = attrs.evolve(saved, recipe=recipe)
    with tempfile.TemporaryDirectory(prefix="meca-ablation-") as tmp:
        rd = Path(tmp)
        (rd / "state" / "steps").mkdir(parents=True)
        if warmup is not None:
            shutil.copyfile(warmup, rd / "state" / "steps" / "meca-warmup.pt")
        if enhanced is not None:
            state = torch.load(enhanced, map_location="cpu", weights_only=True)
            torch.save({"result": {"k": recipe.defense.config.iterations, "model": state, "records": []},
                        "records": []}, rd / "state" / "steps" / "meca-enhance.pt")
        ctx = RunContext.for_parts(parts, device, rd, progress=True)
        t = time.perf_counter()
        res = registry.get("defense", "meca")(recipe.defense.config).run(train, ctx)
        secs = time.perf_counter() - t
        scores = torch.load(rd / "meca_scores.pt", weights_only=False)
        warm = torch.load(rd / "state" / "steps" / "meca-warmup.pt", weights_only=False)
    classes = next((r.get("suspicious_classes") for r in ctx.history if r.get("stage") == "meca-detect"), None)
    return {"result": res, "scores": scores, "seconds": secs, "warmup": warm, "train": train,
            "poison_ids": poison_ids, "classes": classes}


def warmup_path(run_dir: Path, device) -> Path:
    """The warm-up model of ``run_dir`` as a MeCa state file (trained once and cached if needed)."""
    import torch

    cached = run_dir.parent / (run_dir.name + ".warmup.pt")
    if cached.is_file():
        return cached
    saved = run_dir / "meca_warmup_model.pt"
    if saved.is_file():
        torch.save({"result": {"model": torch.load(saved, weights_only=False), "eval": {}, "seconds": 0.0},
                    "records": []}, cached)
        return cached
    print(f"{run_dir.name}: training the warm-up model once (cached as {cached.name}) ...", file=sys.stderr)
    torch.save(_run_meca(run_dir, device, {"iterations": 0}, None)["warmup"], cached)
    return cached


def _load(run_dir: Path, device):
    """The run's registry, warm-up model, poisoned training set and poison ids."""
    import torch

    from bdframe.scan import load_run

    warm = warmup_path(run_dir, device)
    parts, model = load_run(run_dir, device=device)
    registry, train, poison_ids = parts.registry, parts.poisoned, parts.poison_ids
    model.load_state_dict(torch.load(warm, weights_only=False)["result"]["model"])
    return registry, model, train, poison_ids


def adv_kl(run_dir: Path, device, seed: int) -> dict:
    from bdframe.detection import auroc, tpr_at_fpr
    from bdframe.interfaces import ScoreContext

    registry, model, train, poison_ids = _load(run_dir, device)
    truth = train.contains(poison_ids)
    out = {}
    for label, params in ADV_KL_GRID:
        t = time.perf_counter()
        s = registry.create("scorer", "adv-kl", **params).score(
            model, train, ScoreContext(seed=seed, device=device, batch_size=256, progress=True))
        out[label] = {"params": params, "auroc": auroc(s, truth), "tpr_at_5pct_fpr": tpr_at_fpr(s, truth)["0.05"],
                      "seconds": time.perf_counter() - t}
        print(f"{label}: AUROC {out[label]['auroc']:.3f}", file=sys.stderr, flush=True)
    return out


def after(run_dir: Path, device, params: dict) -> dict:
    from bdframe.metrics import detection

    enhanced = run_dir / "meca_enhanced_model.pt"
    if not enhanced.is_file():
        raise SystemExit(f"{run_dir}: no meca_enhanced_model.pt (run MeCa with save_models = true)")
    out = _run_meca(run_dir, device, params, warmup_path(run_dir, device), enhanced)
    res = out["result"]
    run = read_json(run_dir / "metrics.json", {})
    final = res.metrics["relearn"] or res.metrics["clean_model"]
    return {"params": params, "seconds": out["seconds"],
            "detection": detection(res.suspected_ids, out["poison_ids"], out["train"].ids),
            "flagged_share": res.metrics["split"]["poison_share"],
            "suspicious_classes": out["classes"],
            "clean_model": {k: res.metrics["clean_model"].get(k) for k in ("clean_acc", "asr")},
            "final": {k: final.get(k) for k in ("clean_acc", "asr")},
            "run_final": {k: run.get(k) for k in ("clean_acc", "asr")}}


def enhance(run_dir: Path, device, params: dict) -> dict:
    from bdframe.detection import auroc
    from bdframe.metrics import detection

    out = _run_meca(run_dir, device, params, warmup_path(run_dir, device))
    res, s, train, poison_ids = out["result"], out["scores"], out["train"], out["poison_ids"]
    truth = train.contains(poison_ids)
    return {"params": params, "seconds": out["seconds"],
            "detection": detection(res.suspected_ids, poison_ids, train.ids),
            "flagged_share": res.metrics["split"]["poison_share"],
            "trend": [{"iteration": r["iteration"], "clean_acc": r["clean_acc"], "asr": r.get("asr")}
                      for r in res.metrics["trend"]],
            "adv_kl_auroc": [auroc(x, truth) for x in s["consistency_scores"]],
            "enhanced_auroc": auroc(s["enhanced_prob"], truth)}


def main(argv=None) -> dict:
    from bdframe.nn import resolve_device

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["adv-kl", "enhance", "after"])
    ap.add_argument("run_dir", help="a finished MeCa run directory (e.g. of the MeCa sweep)")
    ap.add_argument("params", nargs="*", metavar="KEY=VALUE", help="enhance: MeCa options (JSON values)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    add_results_args(ap, "meca_ablation.json")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    run_dir = Path(args.run_dir)
    params = parse_key_values(args.params)
    out = Path(args.out)
    saved = read_json(out, {"benchmark": "meca_ablation", "rows": {}})
    key = f"{run_dir.name}|{args.what}|" + ",".join(f"{k}={v}" for k, v in sorted(params.items()))
    if key not in saved["rows"] or args.recompute:
        run = {"adv-kl": lambda: adv_kl(run_dir, device, args.seed), "enhance": lambda: enhance(run_dir, device, params),
               "after": lambda: after(run_dir, device, params)}[args.what]
        saved["rows"][key] = run()
        write_json(out, saved)
    row = saved["rows"][key]
    print(f"\n{key}")
    if args.what == "adv-kl":
        print_table([{"variant": k, **v} for k, v in row.items()],
                    [("variant", "adv-kl variant", "{}"), ("auroc", "AUROC", "{:.3f}"),
                     ("tpr_at_5pct_fpr", "TPR@5%FPR", "{:.3f}")])
    elif args.what == "after":
        d = row["detection"]
        print(f"suspicious classes {row['suspicious_classes']}  flagged {100 * row['flagged_share']:.1f}%  "
              f"recall {100 * d['recall']:.1f}%  precision {100 * d['precision']:.1f}%")
        print_table([{"model": "this run's final model (before the change)", **row["run_final"]},
                     {"model": "clean model", **row["clean_model"]},
                     {"model": "final model", **row["final"]}],
                    [("model", "model", "{}"), ("clean_acc", "ACC", "{:.4f}"), ("asr", "ASR", "{:.4f}")])
    else:
        d = row["detection"]
        print(f"recall {100 * d['recall']:.1f}%  precision {100 * d['precision']:.1f}%  "
              f"flagged {100 * row['flagged_share']:.1f}%  enhanced-model AUROC {row['enhanced_auroc']:.3f}")
        print_table([dict(t, auroc=(row["adv_kl_auroc"][t["iteration"] - 1] if t["iteration"] else None))
                     for t in row["trend"]],
                    [("iteration", "iteration", "{}"), ("clean_acc", "ACC", "{:.4f}"), ("asr", "ASR", "{:.4f}"),
                     ("auroc", "adv-kl AUROC", "{:.3f}")])
    return row


if __name__ == "__main__":
    main()
