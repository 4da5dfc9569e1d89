"""The runner-up floor class test beside the gap and separation tests, read on MeCa warm-up models.

MeCa's ``class_stat = "gap-separation-floor"`` picks the class whose largest robust z-score
among three statistics of the warm-up model stands out (above ``spread_k``, at most one class):

- ``gap``: how unequally the warm-up fits the two groups 2-means splits the class's features into;
- ``separation``: how far apart those two groups lie for their spread;
- ``floor``: the share of the class whose most likely other classes cover every other class
  (``runner_up_floor``: C - 1 times the smallest share of any other class among the class's
  runner-ups). Relabelled images drawn from all classes raise it; a clean class's runner-ups
  gather on a few neighbours.

Inside the picked class, the two groups' runner-up entropies and floors, and which group
``split_side = "auto"`` and ``"auto-floor"`` flag, with recall and precision against the run's
poison; the poisoned class's two groups also where the class test does not pick it (whether the
split would have found the poison there).

The class test reads only MeCa's warm-up model (with ``class_test = "warmup"`` and
``iterations = 0``), so this script needs no finished run: for each run of the sweep file
selected by ``--defense`` and ``--only`` it takes ``meca_warmup_model.pt`` from the finished run
in the sweep's directory if there is one, else from ``--work`` (a run of the same recipe
interrupted after its warm-up), else it starts that run (``bdframe run`` on the run's recipe,
written to ``--work``) and stops it once the warm-up model is saved: the same seed gives the
same warm-up. The poison ids are read only to label the target and score the groups.

    python benchmarks/meca_floor_test.py benchmarks/sweeps/meca-cifar10-50k.toml \\
        --defense meca-floor-far-auto --only attack=none --only attack=badnet \\
        --out benchmarks/results/meca_floor_test_50k.json
"""

from __future__ import annotations

import argparse
import functools
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402


def _saved(work: Path, name: str) -> Path | None:
    """The warm-up model of the run ``name`` kept in ``work`` (finished or interrupted), if any."""
    for d in (work / name, work / f"{name}.partial"):
        if (d / "meca_warmup_model.pt").is_file():
            return d / "meca_warmup_model.pt"
    return None


def warmup_model(run, sweep, work: Path, quiet: bool) -> tuple[Path, Path]:
    """The paths of the run's MeCa warm-up model and of its recipe; the model made by an
    interrupted ``bdframe run`` if needed."""
    import toml

    finished = sweep.directory / "runs" / run.name
    if (finished / "meca_warmup_model.pt").is_file():
        return finished / "meca_warmup_model.pt", finished / "recipe.toml"
    work.mkdir(parents=True, exist_ok=True)
    recipe = work / f"{run.name}.toml"
    recipe.write_text(toml.dumps(dict(run.data, output_dir=str(work))))
    if _saved(work, run.name):
        return _saved(work, run.name), recipe
    want = work / f"{run.name}.partial" / "meca_warmup_model.pt"
    if not quiet:
        print(f"{run.name}: training MeCa's warm-up (stopped once {want} is saved)", file=sys.stderr)
    resume = ["--resume"] if (work / f"{run.name}.partial").is_dir() else []  # continue an interrupted one
    proc = subprocess.Popen([sys.executable, "-m", "bdframe.cli", "run", str(recipe), "--quiet", *resume],
                            stdout=subprocess.DEVNULL)
    try:
        while proc.poll() is None and not want.is_file():
            time.sleep(2)
        time.sleep(3)  # the file is written atomically; let the run get past it
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
    if _saved(work, run.name):
        return _saved(work, run.name), recipe
    raise SystemExit(f"meca_floor_test.py: the run {run.name} ended without saving a warm-up model "
                     f"(rc {proc.returncode}); see {recipe}")


def read_row(run, paths: tuple[Path, Path], k: float) -> dict:
    import torch

    from bdframe.build import materialise
    from bdframe.interfaces import ScoreContext
    from bdframe.plugins import load_recipe
    from bdframe.scoring import features, logits
    from bdframe_defense_meca.plugin import (_two_clusters, classes_above, confidence_scores, floor_z,
                                             gap_separation_z, margins, runner_up_entropy, runner_up_floor,
                                             split_side)

    model_path, recipe_path = paths
    recipe, registry = load_recipe(recipe_path)
    parts = materialise(recipe, registry)
    data = parts.poisoned
    model = parts.build_model()
    model.load_state_dict(torch.load(model_path, map_location="cpu", weights_only=True))
    model.eval()
    ctx = ScoreContext(progress=False)
    out = logits(model, data, ctx)
    feats = features(model, data, ctx).double()
    prob = torch.softmax(out.double(), 1)
    labels = torch.as_tensor(data.labels, dtype=torch.int64)
    ids = torch.as_tensor(data.ids, dtype=torch.int64)
    truth = torch.isin(ids, torch.as_tensor(parts.poison_ids, dtype=torch.int64)) if parts.poison_ids is not None \
        else torch.zeros(len(ids), dtype=torch.bool)
    target = int(torch.mode(labels[truth]).values) if bool(truth.any()) else None
    names = data.classes
    key = ("meca-clusters", int(recipe.seed))
    present, z, both = gap_separation_z(feats, margins(out, labels), labels, ids, key)
    _, both["floor"] = floor_z(prob, labels)
    _, floor = runner_up_floor(prob, labels)
    z_all = torch.maximum(z, both["floor"])
    row = {"run": run.name, "target": None if target is None else names[target], "poisoned": int(truth.sum()),
           "gap_separation_pick": [names[c] for c in classes_above(present, z, k=k, limit=1)],
           "floor_pick": [names[c] for c in classes_above(present, both["floor"], k=k, limit=1)],
           "pick": [names[c] for c in classes_above(present, z_all, k=k, limit=1)],
           "floor": {names[int(c)]: float(v) for c, v in zip(present, floor)}}
    for name, v in both.items():
        zc = {int(c): float(x) for c, x in zip(present, v)}
        row[f"{name}_z"] = {names[c]: x for c, x in zc.items()}
        row[f"target_{name}_z"] = None if target is None else zc.get(target)
        others = [(x, c) for c, x in zc.items() if c != target]
        row[f"top_other_{name}_z"] = max(others)[0] if others else None
        row[f"top_other_{name}_class"] = names[max(others)[1]] if others else None
    @functools.cache  # the picked class is usually the poisoned one: draw its split once
    def two_groups(c: int):
        """The class's 2-means groups (as MeCa's split draws them) with their poison counts."""
        rows = torch.nonzero(labels == c).flatten()
        assign = _two_clusters(feats[rows], ids[rows], key, 10)
        if assign is None:
            return rows, None, None
        groups = []
        for g in (0, 1):
            in_g = rows[assign == g]
            groups.append({"size": len(in_g), "poisoned": int(truth[in_g].sum()),
                           "runner_up_entropy": runner_up_entropy(prob[in_g], c),
                           "floor": float(runner_up_floor(prob[in_g], labels[in_g])[1][0])})
        return rows, assign, groups

    if target is not None:
        # read whether or not the class test picks it: where it does not, this tells whether the
        # split would have found the poison had the class been picked
        row["target_groups"] = two_groups(target)[2]
    picked = classes_above(present, z_all, k=k, limit=1)
    if picked:
        c = picked[0]
        rows, assign, groups = two_groups(c)
        if assign is not None:
            row["groups"] = groups
            signal = confidence_scores(prob[rows, c])  # the signal MeCa's split reads
            n = max(1, int(truth.sum()))
            for side in ("auto", "auto-floor"):
                s = split_side(assign, signal, prob[rows], c, side=side)
                if s is not None:
                    g = groups[s]
                    row[side] = {"size": g["size"], "recall": g["poisoned"] / n if truth.any() else None,
                                 "precision": g["poisoned"] / g["size"]}
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_file")
    ap.add_argument("--defense", required=True, help="the defense label of a MeCa column of the sweep file")
    ap.add_argument("--only", action="append", default=[], metavar="AXIS=LABEL",
                    help="as for bdframe sweep run (repeatable), e.g. --only attack=badnet")
    ap.add_argument("--work", default="benchmarks/results/meca_floor_warmups",
                    help="where interrupted warm-up runs are kept (default benchmarks/results/meca_floor_warmups)")
    ap.add_argument("--k", type=float, default=2.0, help="the robust z cut (spread_k, default 2.0)")
    ap.add_argument("--out", help="also write the rows as JSON here")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    from bdframe import sweep as sweeps
    from bdframe.errors import UserError

    if not args.k > 0:
        print("meca_floor_test.py: --k must be above 0", file=sys.stderr)
        return 2
    try:
        sw = sweeps.load(args.sweep_file)
        want = {}
        for item in args.only:
            axis, sep, label = item.partition("=")
            if not sep:
                raise UserError(f"--only {item!r}: expected AXIS=LABEL")
            want.setdefault(axis, set()).add(label)
        runs = [r for r in sw.runs if r.labels.get("defense") == args.defense
                and all(r.labels.get(a) in labels for a, labels in want.items())]
    except UserError as e:
        print("\n".join(e.messages), file=sys.stderr)
        return 2
    if not runs:
        print(f"meca_floor_test.py: no run of {args.sweep_file} has defense {args.defense!r} and the --only labels",
              file=sys.stderr)
        return 2
    bad = [r.name for r in runs if r.data.get("defense", {}).get("name") != "meca"]
    if bad:
        print(f"meca_floor_test.py: --defense {args.defense!r} is not a MeCa column of {args.sweep_file} "
              f"({len(bad)} of its runs use another defense)", file=sys.stderr)
        return 2
    rows = [read_row(r, warmup_model(r, sw, Path(args.work), args.quiet), args.k) for r in runs]
    for r in rows:
        for key in ("gap_separation_pick", "floor_pick", "pick"):
            r[key + "_s"] = ", ".join(r[key]) or "none"
        for side in ("auto", "auto-floor"):
            m = r.get(side)
            r[side + "_s"] = "-" if m is None else (
                f"{m['size']} ({'-' if m['recall'] is None else format(100 * m['recall'], '.1f')} / "
                f"{100 * m['precision']:.1f})")
        for k_in, k_out in (("groups", "groups_s"), ("target_groups", "target_groups_s")):
            g = r.get(k_in)
            r[k_out] = "-" if g is None else " | ".join(
                f"{x['size']} ({x['poisoned']} p.) H {x['runner_up_entropy']:.2f} floor {x['floor']:.2f}" for x in g)
        r["target_floor"] = None if r["target"] is None else r["floor"][r["target"]]
    print_table(rows, [("run", "run", "{}"), ("target", "poisoned class", "{}"),
                       ("gap_separation_pick_s", "gap-separation picks", "{}"),
                       ("target_floor", "floor, poisoned class", "{:.3f}"),
                       ("target_floor_z", "its z", "{:.2f}"), ("top_other_floor_z", "floor z other max", "{:.2f}"),
                       ("top_other_floor_class", "(class)", "{}"),
                       ("pick_s", "gap-separation-floor picks", "{}"),
                       ("groups_s", "the picked class's two groups", "{}"),
                       ("target_groups_s", "the poisoned class's two groups", "{}"),
                       ("auto_s", "auto flags (recall / precision %)", "{}"),
                       ("auto-floor_s", "auto-floor flags", "{}")])
    if args.out:
        write_json(Path(args.out), {"sweep": args.sweep_file, "defense": args.defense, "k": args.k,
                                    "rows": [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
