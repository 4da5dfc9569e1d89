"""Draw docs/attacks.png: one row per registered attack (labelled with its name), a few test
images each as three columns, "clean", "poisoned" (the attack's test-time trigger) and
"difference x4" (4 x |poisoned - clean| per channel, clipped; black = unchanged).

    python docs/make_attack_grid.py --data <image-folder tree with test/>   # e.g. CIFAR-10
    python docs/make_attack_grid.py                                         # synthetic data

Needs matplotlib (``pip install 'bdframe[plots]'``). Each attack runs with its defaults (the
MeCa presets); the images are the first test images of the classes the attack's ASR set covers,
so the same pictures appear in most rows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main(argv=None) -> int:
    from bdframe import plots
    from bdframe.plugins import load_registry

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="image-folder root holding test/ (default: the synthetic dataset)")
    ap.add_argument("--n", type=int, default=3, help="images per attack (default 3)")
    ap.add_argument("--cell", type=float, default=1.0, help="width of one image in inches at 100 dpi (default 1.0)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "attacks.png"))
    args = ap.parse_args(argv)
    if not plots.available():
        return 1

    reg = load_registry()
    if args.data:
        ds = reg.create("dataset", "imagefolder", root=args.data, train_size=2000)
        source = f"{Path(args.data).resolve().name} test images"
    else:
        ds = reg.create("dataset", "synthetic", train_size=2000, test_size=500)
        source = "synthetic test images"
    train, test = ds.load()
    names = reg.names("attack")
    rows = []
    for name in names:
        attack = reg.create("attack", name)
        attack.poison_train(train, seed=0)  # some attacks (wanet) fix their trigger here
        asr = attack.poison_test(test)
        pick = torch.arange(min(args.n, len(asr)))
        poisoned = asr.images[pick].float()
        clean = test.images[test.positions(asr.ids[pick])].float()
        diff = ((poisoned - clean).abs() * 4).clamp(0, 255)
        rows.append([img for c, p, d in zip(clean, poisoned, diff) for img in (c, p, d)])
    n = max(len(r) for r in rows) // 3
    drawn = plots.image_grid(
        rows, Path(args.out), row_labels=names, col_labels=["clean", "poisoned", "difference x4"] * n, group=3,
        cell=args.cell, title=f"Backdoor attacks (defaults) on {source}",
        caption="difference x4 = 4 \u00d7 |poisoned \u2212 clean| per colour channel, clipped (black = unchanged)")
    print(f"wrote {args.out} ({drawn['size_px'][0]}x{drawn['size_px'][1]} px): rows = {', '.join(names)}; "
          f"columns = clean, poisoned, difference x4")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
