"""Test accuracy per class of finished runs' models: where a defense's lost accuracy goes.

A defense that flags clean samples of one class and unlearns them costs accuracy in that class
above all; the overall ACC does not say so. For each ``RUN_DIR`` (or ``RUN_DIR:FILE`` for another
model file the run saved, e.g. MeCa's ``meca_warmup_model.pt``) this rebuilds the run's dataset and
model from its recipe, loads the weights, and prints the accuracy on each class of the test set
beside the overall accuracy. The test set is read for reporting only.

    R=benchmarks/results/sweeps/meca-cifar10-50k/runs
    python benchmarks/per_class_accuracy.py "$R/attack=blend,defense=meca-gap-clusters-k5:meca_warmup_model.pt" \\
        "$R/attack=blend,defense=meca-gap-clusters-k5" --out benchmarks/results/per_class_accuracy.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402


def test_predictions(model, test, device="cpu"):
    """``model``'s predicted class for each image of ``test``, read without touching the global
    random state (a replayed training after it stays the same)."""
    import torch

    from bdframe.interfaces import ScoreContext
    from bdframe.scoring import logits

    with torch.random.fork_rng():
        return logits(model.eval(), test, ScoreContext(device=device, progress=False)).argmax(1).cpu()


def class_accuracies(pred, test) -> list:
    """The accuracy of predictions ``pred`` on each class of ``test`` (None for a class with no
    test image)."""
    y = test.labels.cpu()
    return [float((pred[y == c] == c).double().mean()) if bool((y == c).any()) else None
            for c in range(test.num_classes)]


def load_model_spec(spec: str, device):
    """``RUN_DIR`` or ``RUN_DIR:FILE``: the run's rebuilt parts, its model with ``model.pt`` (or
    the other model file ``FILE`` the run saved) loaded, the run directory and the file's name.
    A missing run file or model file is a ``UserError``."""
    import torch

    from bdframe.errors import UserError
    from bdframe.scan import load_run

    run, _, file = spec.partition(":")
    d = Path(run)
    parts, model = load_run(d, device=device)
    if file:
        path = d / file
        if not path.is_file():
            raise UserError(f"{str(path)!r} does not exist (the run saves its extra models with save_models = true)")
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return parts, model, d, file or "model.pt"


def per_class(spec: str, device) -> dict:
    parts, model, d, file = load_model_spec(spec, device)
    test = parts.test
    pred = test_predictions(model, test, device)
    names = test.classes or tuple(str(c) for c in range(test.num_classes))
    acc = {names[c]: a for c, a in enumerate(class_accuracies(pred, test)) if a is not None}
    return {"run": d.name, "model": file, "acc": float((pred == test.labels.cpu()).double().mean()),
            "per_class": acc}


def main(argv=None) -> int:
    from bdframe.errors import UserError
    from bdframe.nn import resolve_device

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR[:FILE]", help="finished run directories (FILE: another "
                                                                       "model file in it; default model.pt)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    try:
        rows = [per_class(spec, resolve_device(args.device)) for spec in args.runs]
    except UserError as e:
        print(f"per_class_accuracy.py: {e}", file=sys.stderr)
        return 2
    names = list(rows[0]["per_class"])
    flat = [{"run": r["run"], "model": r["model"], "acc": 100 * r["acc"],
             **{n: 100 * r["per_class"].get(n, float("nan")) for n in names}} for r in rows]
    print_table(flat, [("run", "run", "{}"), ("model", "model", "{}"), ("acc", "ACC %", "{:.2f}")]
                + [(n, n, "{:.1f}") for n in names])
    if args.out:
        write_json(Path(args.out), {"rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
