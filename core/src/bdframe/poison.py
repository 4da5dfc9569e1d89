"""``bdframe poison``: write a recipe's poisoned dataset as an image folder plus a manifest.

Output (written to ``<out>.partial`` and renamed when complete)::

    <out>/train/<class>/<id>.png      the poisoned training set, in the folder of its given label
    <out>/test/<class>/<id>.png       the clean test set
    <out>/test-asr/<class>/<id>.png   the attack's poisoned test set (ASR set), target-labelled
    <out>/clean/<class>/<id>.png      with [clean]: the reserved trusted clean images
    <out>/manifest.csv                split, id, file, original_label, given_label, poisoned, cover
    <out>/recipe.toml                 the resolved recipe; <out>/poison.json: ids and attack meta

``train``/``test`` form an image-folder tree that the ``imagefolder`` dataset (and other tools)
read directly.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
from pathlib import Path

from bdframe.errors import UserError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("poison", help="write a recipe's poisoned dataset as an image folder + manifest")
    p.add_argument("recipe", help="a recipe with [dataset] and [attack]")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _write_split(root: Path, split: str, data, orig_labels, poison, cover, writer, bar) -> None:
    from torchvision.io import write_png

    classes = data.classes or tuple(str(i) for i in range(data.num_classes))
    for cls in classes:
        (root / split / cls).mkdir(parents=True, exist_ok=True)
    for i in range(len(data)):
        sid = int(data.ids[i])
        label = int(data.labels[i])
        rel = f"{split}/{classes[label]}/{sid:06d}.png"
        write_png(data.images[i], str(root / rel))
        writer.writerow([split, sid, rel, int(orig_labels[i]), label, int(sid in poison), int(sid in cover)])
        bar.update(1)


def main(args) -> int:
    from bdframe.build import materialise
    from bdframe.plugins import load_recipe
    from bdframe.progress import Progress
    from bdframe.runs import write_json_atomic, write_text_atomic

    recipe, registry = load_recipe(args.recipe)
    if recipe.attack is None:
        raise UserError(f"{args.recipe}: $.attack: `bdframe poison` needs an [attack] section")
    out = Path(args.out)
    tmp = out.with_name(out.name + ".partial")
    if out.exists() and not args.overwrite:
        raise UserError(f"output folder {str(out)!r} already exists; pass --overwrite to replace it")
    parts = materialise(recipe, registry)  # the same poisoning as `bdframe run` with this recipe
    train, test, asr = parts.train, parts.test, parts.asr_set
    poison, cover = set(parts.poison_ids.tolist()), set(parts.cover_ids.tolist())
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["split", "id", "file", "original_label", "given_label", "poisoned", "cover"])
        clean = parts.clean
        total = len(train) + len(test) + len(asr) + (len(clean) if clean is not None else 0)
        with Progress(total, "writing images", unit="img", enabled=False if args.quiet else None) as bar:
            _write_split(tmp, "train", parts.poisoned, train.labels, poison, cover, w, bar)
            if clean is not None:  # the recipe's [clean] reserve, never poisoned
                _write_split(tmp, "clean", clean, clean.labels, set(), set(), w, bar)
            _write_split(tmp, "test", test, test.labels, set(), set(), w, bar)
            asr_orig = test.labels[test.positions(asr.ids)]
            _write_split(tmp, "test-asr", asr, asr_orig, set(), set(), w, bar)
        write_text_atomic(tmp / "manifest.csv", buf.getvalue())
        write_text_atomic(tmp / "recipe.toml", recipe.to_toml())
        write_json_atomic(tmp / "poison.json", parts.poison_info())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    reserve = f", {len(parts.clean)} clean (the [clean] reserve)" if parts.clean is not None else ""
    print(f"wrote {len(train)} train{reserve}, {len(test)} test and {len(asr)} ASR-set images with manifest.csv to {out}")
    return 0
