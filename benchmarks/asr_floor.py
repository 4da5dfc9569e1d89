"""The ASR a model that never saw the poison gives each attack: the floor under a defense's ASR.

ASR is the share of the attack's triggered test images (the non-target classes', or TaCT's source
class's) that a model calls by the target class. A model trained on clean data calls some of
them by the target too: the images it confuses with the target class anyway (a cat called a dog),
and those the trigger itself pushes there (a patch that hides the part of the image the model
reads). No defense can bring the ASR below what such a model gives, so a defense's ASR is read
against this floor, not against zero.

For each ``--model`` (a finished run on data without an attack; ``DIR:FILE`` for another model
file the run saved) and each ``--attack`` (a finished run of an attack, defended or not: only its
recipe's attack and its saved attack seed are read, and its ``metrics.json`` ASR is shown beside),
this rebuilds the attack's test set and prints

- ``floor``: the share of the triggered test images the clean model calls by the target;
- ``untriggered``: the share of the same test images, without the trigger, it calls by the
  target (the confusion alone);
- the attack run's own ASR.

    R=benchmarks/results/sweeps/meca-cifar10-50k/runs
    H=benchmarks/results/sweeps/meca-defaults-heldout-50k/runs
    python benchmarks/asr_floor.py --model /tmp/clean-none-seed1 \\
        --attack "$H/attack=badnet-t5,defense=meca-relearn-train" --attack "$R/attack=badnet,defense=none" \\
        --out benchmarks/results/asr_floor.json

The test set is read for reporting only; nothing here feeds a defense.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402
from per_class_accuracy import load_model_spec, test_predictions  # noqa: E402


def _refuse(message: str):
    print(f"asr_floor.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def load_clean_model(spec: str, device):
    """``RUN_DIR[:FILE]``'s parts, model and label (:func:`per_class_accuracy.load_model_spec`);
    refused unless the run trained on data without an attack."""
    from bdframe.errors import UserError

    try:
        parts, model, d, name = load_model_spec(spec, device)
    except UserError as e:
        _refuse(f"--model {spec!r}: {e}")
    if parts.recipe.attack is not None:
        _refuse(f"--model {str(d)!r}: the run trained on data poisoned by {parts.recipe.attack.name!r}; "
                f"the floor needs a model trained on data without an attack")
    return parts, model.eval(), (d.name if name == "model.pt" else f"{d.name}:{name}")


def floor_row(model, test, asr_set, device) -> dict:
    """The clean model's share of ``asr_set`` (the triggered images, labelled with the target)
    called by the target, and of the same test images without the trigger."""
    targets = asr_set.labels.cpu().unique()
    if len(targets) != 1:
        raise ValueError(f"the ASR set is labelled with {len(targets)} classes; the floor is defined for one target")
    target = int(targets[0])
    pred = test_predictions(model, asr_set, device)
    row = {"target": target, "n": len(asr_set), "floor": float((pred == target).double().mean())}
    inside = test.contains(asr_set.ids)
    if int(inside.sum()) == len(asr_set):
        plain = test_predictions(model, test.subset(inside), device)
        row["untriggered"] = float((plain == target).double().mean())
    return row


def _run_asr(run_dir: Path):
    m = run_dir / "metrics.json"
    if not m.is_file():
        return None
    return json.loads(m.read_text()).get("asr")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, metavar="RUN_DIR[:FILE]",
                    help="a finished run on data without an attack (repeatable)")
    ap.add_argument("--attack", action="append", required=True, metavar="RUN_DIR",
                    help="a finished run of an attack (repeatable)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)

    import torch

    from bdframe.errors import UserError
    from bdframe.scan import rebuild_parts

    device = torch.device(args.device)
    models = []
    for text in args.model:
        parts, model, label = load_clean_model(text, device)
        models.append((label, parts, model))
    rows = []
    for text in args.attack:
        d = Path(text)
        try:
            parts = rebuild_parts(d)
        except UserError as e:
            _refuse(f"--attack {text!r}: {e}")
        if parts.recipe.attack is None or parts.asr_set is None:
            _refuse(f"--attack {text!r}: the run has no attack")
        for label, clean_parts, model in models:
            if len(clean_parts.test) != len(parts.test) or not torch.equal(clean_parts.test.labels.cpu(), parts.test.labels.cpu()):
                _refuse(f"--attack {text!r} and --model {label!r} have different test sets")
            row = {"attack_run": d.name, "attack": parts.recipe.attack.name, "model": label,
                   **floor_row(model, parts.test, parts.asr_set, device), "run_asr": _run_asr(d)}
            rows.append(row)
            print(f"{d.name} on {label}: floor {100 * row['floor']:.2f}%", file=sys.stderr, flush=True)
    for r in rows:
        for k in ("floor", "untriggered", "run_asr"):
            if r.get(k) is not None:
                r[f"{k}_pct"] = 100 * r[k]
    print_table(rows, [("attack_run", "attack run", "{}"), ("model", "clean model", "{}"), ("target", "target", "{}"),
                       ("n", "ASR set", "{}"), ("floor_pct", "floor %", "{:.2f}"),
                       ("untriggered_pct", "untriggered %", "{:.2f}"), ("run_asr_pct", "run's ASR %", "{:.2f}")])
    if args.out is not None:
        write_json(args.out, {"models": [m[0] for m in models], "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
