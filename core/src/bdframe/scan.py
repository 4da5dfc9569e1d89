"""``bdframe scan``: score the training set of a saved run with one or more SampleScorers.

A run directory (written by ``bdframe run``) holds ``recipe.toml``, ``run.json`` (with the
attack seed), ``poison.json`` (the ground-truth ``poison_ids`` / ``cover_ids``) and ``model.pt``
(the state dict of the :class:`~bdframe.nn.Classifier`). The poisoned training set is rebuilt by
re-running the recipe's dataset and attack with the saved attack seed (and checked against
``poison.json``); the model is rebuilt from the recipe's model section and loaded.

Output directory (default ``<run>/scan``; written to a temporary sibling and renamed when
complete, so a failed scan leaves nothing behind):

- ``scores.csv``: ``id, path`` (the file relative to the dataset root, for datasets made of
  files; empty otherwise), ``label, truth`` (poison / cover / clean) and, per scorer, its score and
  rank (1 = most suspicious; ties broken by id);
- ``hist-<scorer>.png``: a histogram of the scores per group (clean in blue, poison in red,
  cover in green; group sizes in the legend) on a logarithmic count axis, so a small poison group
  stays readable; drawn with matplotlib (``pip install 'bdframe[plots]'``); without it the scan
  completes, skips the picture and records ``"histogram": null`` in ``metrics.json``;
- ``metrics.json``: per scorer the AUROC, the TPR at 1/5/10% FPR and, for scorers with a split
  rule (a ``flag(scores, data)`` method), the precision, recall and FPR of that rule. Poison ids
  are the positives; cover samples (trigger, true label) count as negatives.

Scorers that use clean auxiliary data (``strip``, ``scan``) draw it from the inspected set by
default; ``--clean-aux N`` gives them a class-balanced draw of N images from the run's trusted
clean data (the recipe's ``[clean]`` reserve) instead, or from the clean *test* split when the
recipe has none (held-out data, never the training ground truth).
"""

from __future__ import annotations

import argparse
import csv
import inspect
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

from bdframe.errors import UserError


def add_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser(
        "scan", help="score a run's training set with poisoned-sample scorers (AUROC, TPR@FPR, histograms)",
        description="Score the poisoned training set of a saved run directory with one or more scorers; "
                    "write scores.csv, a histogram per scorer and metrics.json.")
    s.add_argument("run_dir", help="a run directory written by `bdframe run`")
    s.add_argument("--scorer", action="append", default=[], metavar="NAME",
                   help="scorer to run (repeatable), e.g. --scorer adv-kl --scorer loss")
    s.add_argument("--param", action="append", default=[], metavar="SCORER.KEY=VALUE",
                   help="scorer parameter (repeatable; a TOML value or a fraction such as 8/255), "
                        "e.g. --param adv-kl.epsilon=0.02")
    s.add_argument("--out", help="output directory (default: <run_dir>/scan)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    s.add_argument("--batch-size", type=int, default=256, help="scoring batch size (default 256)")
    s.add_argument("--seed", type=int, help="scorer seed (default: the recipe's seed)")
    s.add_argument("--limit", type=int, help="score only N samples (a seeded draw by id, for quick looks)")
    s.add_argument("--clean-aux", type=int, metavar="N",
                   help="give scorers that accept a clean aux set N class-balanced images of the run's [clean] "
                        "data (of the clean test split when the recipe has no [clean])")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    return s


def parse_value(text: str):
    """A TOML value (``0.02``, ``true``, ``["rotate"]``, ``"grid"``) or a fraction of two numbers
    (``8/255``); a bare word is a string."""
    import re

    import toml

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*/\s*([0-9]*\.?[0-9]+)\s*", text)
    if m and float(m.group(2)) != 0:
        return float(m.group(1)) / float(m.group(2))
    try:
        return toml.loads(f"v = {text}")["v"]
    except Exception:
        return text


def parse_params(items: list[str], scorers: list[str]) -> dict[str, dict]:
    params: dict[str, dict] = {name: {} for name in scorers}
    problems = []
    for item in items:
        key, eq, value = item.partition("=")
        name, dot, field = key.strip().partition(".")
        if not eq or not dot or not name or not field:
            problems.append(f"--param {item!r}: expected SCORER.KEY=VALUE, e.g. adv-kl.epsilon=0.02")
            continue
        if name not in params:
            problems.append(f"--param {item!r}: scorer {name!r} is not selected with --scorer "
                            f"(selected: {', '.join(scorers) or 'none'})")
            continue
        params[name][field] = parse_value(value.strip())
    if problems:
        raise UserError(problems)
    return params


def rebuild_parts(run_dir: Path, recipe=None, registry=None):
    """The :class:`~bdframe.build.RunParts` of a saved run: rebuilt from its recipe (or from
    ``recipe`` with ``registry``, e.g. the run's recipe with another defense) with the run's saved
    attack seed, and checked against its ``poison.json`` where the directory keeps one."""
    from bdframe.build import materialise
    from bdframe.plugins import load_recipe
    from bdframe.runs import read_json

    for f in ("recipe.toml", "run.json"):
        if not (run_dir / f).is_file():
            raise UserError(f"{str(run_dir)!r} is not a complete run directory: {f} is missing")
    if recipe is None:
        recipe, registry = load_recipe(run_dir / "recipe.toml")
    try:
        run_info = read_json(run_dir / "run.json")
        attack_seed = int(run_info["seeds"]["attack"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{str(run_dir / 'run.json')!r} has no usable seeds.attack ({type(e).__name__}: {e})") from None
    parts = materialise(recipe, registry, seed=attack_seed)
    pj = run_dir / "poison.json"
    if recipe.attack is not None and pj.is_file():
        saved = read_json(pj)
        if sorted(saved.get("poison_ids", [])) != sorted(int(i) for i in parts.poison_ids) or \
                sorted(saved.get("cover_ids", [])) != sorted(int(i) for i in parts.cover_ids):
            raise UserError(f"the rebuilt poisoned set does not match {str(pj)!r} (did the dataset, the "
                            f"attack plugin or its version change since the run?)")
    return parts


def load_run(run_dir: Path, *, device):
    """The :class:`~bdframe.build.RunParts` of a saved run (:func:`rebuild_parts`) and its final
    model."""
    import torch

    for f in ("recipe.toml", "run.json", "model.pt"):
        if not (run_dir / f).is_file():
            raise UserError(f"{str(run_dir)!r} is not a complete run directory: {f} is missing")
    parts = rebuild_parts(run_dir)
    recipe = parts.recipe
    model = parts.build_model()
    try:
        state = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as e:
        raise UserError(f"{str(run_dir / 'model.pt')!r} does not load into the recipe's model "
                        f"{recipe.model.name!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return parts, model.to(device).eval()


# -- output helpers ------------------------------------------------------------------------------

def _histogram(name: str, scores, groups: dict, out_dir: Path, *, recipe_name: str, res: dict):
    """Draw ``hist-<name>.png`` in ``out_dir`` with :func:`bdframe.plots.histogram`; its description
    for metrics.json, or None when matplotlib is not installed (nothing drawn)."""
    from bdframe import plots

    auroc = res.get("auroc")
    title = f"{name} scores, run {recipe_name}" + (f" (AUROC {auroc:.3f})" if auroc is not None else "")
    return plots.histogram(scores, groups, out_dir / f"hist-{name}.png", title=title,
                           xlabel=f"{name} score (higher = more suspicious)")


def _ranks(scores, ids):
    """1 = highest score; ties broken by ascending id."""
    import torch

    by_id = torch.argsort(ids)
    order = by_id[torch.argsort(scores[by_id], descending=True, stable=True)]
    ranks = torch.empty(len(scores), dtype=torch.int64)
    ranks[order] = torch.arange(1, len(scores) + 1)
    return ranks


def _json_safe(obj):
    import math

    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def main(args) -> int:
    import torch

    from bdframe import detection
    from bdframe.interfaces import ScoreContext
    from bdframe.nn import resolve_device
    from bdframe.recipe import config_to_dict
    from bdframe.scoring import balanced_draw, order_by_key

    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {str(run_dir)!r} does not exist" if not run_dir.exists()
                        else f"{str(run_dir)!r} is not a directory")
    if not args.scorer:
        raise UserError("no scorer given; add --scorer NAME (see `bdframe plugins` for the installed scorers)")
    dup = sorted({s for s in args.scorer if args.scorer.count(s) > 1})
    if dup:
        raise UserError(f"--scorer given more than once: {', '.join(dup)}")
    for opt in ("batch_size", "limit", "clean_aux"):
        v = getattr(args, opt)
        if v is not None and v <= 0:
            raise UserError(f"--{opt.replace('_', '-')} must be a positive integer, got {v}")
    out = Path(args.out) if args.out else run_dir / "scan"
    if out.exists() and not args.overwrite:
        raise UserError(f"output directory {str(out)!r} already exists; pass --overwrite to replace it "
                        f"or --out to choose another")
    params = parse_params(args.param, args.scorer)
    device = resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device!r}: CUDA is not available; use --device auto")

    # validate the scorers before the (slow) rebuild of the run
    from bdframe import recipe as rmod
    from bdframe.plugins import load_registry

    settings, _ = rmod.plugin_settings(rmod.parse_toml(run_dir / "recipe.toml")) if (run_dir / "recipe.toml").is_file() \
        else (rmod.PluginSettings(), [])
    pre = load_registry(block=settings.block, modules=settings.modules)
    problems = []
    for name in args.scorer:
        if not pre.has("scorer", name):
            problems.append(pre.unknown_message("scorer", name))
        else:
            problems += rmod.config_problems(pre.get("scorer", name), params[name], f"scorer:{name}")
    if problems:
        raise UserError(problems)

    parts, model = load_run(run_dir, device=device)
    recipe, registry, train, test = parts.recipe, parts.registry, parts.poisoned, parts.test
    poison_ids, cover_ids = parts.poison_ids, parts.cover_ids
    files = parts.dataset.sample_files("train")
    scorers = {name: registry.create("scorer", name, **params[name]) for name in args.scorer}
    seed = recipe.seed if args.seed is None else args.seed
    data = train
    if args.limit and args.limit < len(train):
        rows = torch.sort(order_by_key(("scan-limit", seed), train.ids)[: args.limit]).values
        data = train.subset(rows)
    aux = None
    if args.clean_aux:
        pool = parts.clean if parts.clean is not None else test  # the run's own clean data when it has some
        aux = pool.subset(balanced_draw(pool, min(args.clean_aux, len(pool)), ("scan-clean-aux", seed)))
    known = recipe.attack is not None
    is_poison = data.contains(poison_ids)
    is_cover = data.contains(cover_ids)
    log(f"scan {run_dir}: {len(data)} samples ({int(is_poison.sum())} poisoned, {int(is_cover.sum())} cover), "
        f"device {device}, scorers {', '.join(scorers)}")

    ctx = ScoreContext(seed=seed, device=device, batch_size=args.batch_size, progress=not args.quiet)
    results: dict[str, dict] = {}
    columns: dict[str, torch.Tensor] = {}
    for name, scorer in scorers.items():
        t0 = time.perf_counter()
        kwargs = {}
        if aux is not None and "aux" in inspect.signature(scorer.score).parameters:
            kwargs["aux"] = aux
        s = scorer.score(model, data, ctx, **kwargs).detach().cpu().double()
        secs = time.perf_counter() - t0
        if s.shape != (len(data),) or not bool(torch.isfinite(s).all()):
            raise RuntimeError(f"scorer {name!r} returned {tuple(s.shape)} scores for {len(data)} samples "
                               f"or non-finite values")
        columns[name] = s
        res = {"params": config_to_dict(scorer.config), "set_level": bool(getattr(scorer, "set_level", False)),
               "seconds": secs, "clean_aux": bool(kwargs),
               "score_stats": {"min": float(s.min()), "max": float(s.max()), "mean": float(s.mean())}}
        flag_fn = getattr(scorer, "flag", None)
        flagged = flag_fn(s, data) if flag_fn is not None else None
        if known:
            res.update(detection.summary(s, is_poison, flagged=flagged))
            if flagged is not None:
                doc = (inspect.getdoc(flag_fn) or "").splitlines()
                res["split"]["rule"] = doc[0] if doc else f"{name}.flag"
            log(f"{name}: AUROC {res['auroc']:.4f}, TPR@1% {res['tpr_at_fpr']['0.01']:.3f}, "
                f"TPR@5% {res['tpr_at_fpr']['0.05']:.3f}, TPR@10% {res['tpr_at_fpr']['0.1']:.3f} ({secs:.1f} s)")
        elif flagged is not None:
            res["split"] = {"flagged": int(flagged.sum())}
        res["_flagged"] = flagged
        results[name] = res

    # write everything into a temporary sibling, then rename
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        truth = ["poison" if p else "cover" if c else "clean" for p, c in zip(is_poison.tolist(), is_cover.tolist())]
        ranks = {name: _ranks(s, data.ids) for name, s in columns.items()}
        head = ["id", "path", "label", "truth"] + [c for name in columns for c in (name, f"{name}_rank")]
        ids, labels = data.ids.tolist(), data.labels.tolist()
        cols = {name: (s.tolist(), ranks[name].tolist()) for name, s in columns.items()}
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(head)
        for i in range(len(data)):
            row = [str(ids[i]), (files or {}).get(ids[i], ""), str(labels[i]), truth[i] if known else ""]
            for name in columns:
                row += [f"{cols[name][0][i]:.9g}", str(cols[name][1][i])]
            w.writerow(row)
        (tmp / "scores.csv").write_text(buf.getvalue(), encoding="utf-8")
        for name, s in columns.items():
            groups = {"clean": ~is_poison & ~is_cover, "poison": is_poison, "cover": is_cover} if known \
                else {"all": torch.ones(len(s), dtype=torch.bool)}
            results[name]["histogram"] = _histogram(name, s, groups, tmp, recipe_name=recipe.name,
                                                    res=results[name])
        for r in results.values():
            r.pop("_flagged", None)
        metrics = {"run_dir": str(run_dir), "recipe": recipe.name, "attack": recipe.attack.name if known else None,
                   "n": len(data), "num_poison": int(is_poison.sum()), "num_cover": int(is_cover.sum()),
                   "positives": "poison ids (cover samples count as negatives)", "seed": seed,
                   "device": str(device), "batch_size": args.batch_size, "limit": args.limit,
                   "clean_aux": args.clean_aux, "scorers": results}
        (tmp / "metrics.json").write_text(json.dumps(_json_safe(metrics), indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"scan complete: {out}")
    return 0
