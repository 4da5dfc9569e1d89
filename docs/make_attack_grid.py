"""Draw docs/attacks.png: for every registered attack, a few test images clean and with the
attack's test-time trigger, plus the difference amplified x4 (grey = unchanged).

    python docs/make_attack_grid.py --data <image-folder tree with test/>   # e.g. CIFAR-10
    python docs/make_attack_grid.py                                         # synthetic data

Each attack runs with its defaults (the MeCa presets); the images are the first test images
of the classes the attack's ASR set covers, so the same pictures appear in most rows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main(argv=None) -> int:
    from torchvision.io import write_png

    from bdframe.plugins import load_registry

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="image-folder root holding test/ (default: the synthetic dataset)")
    ap.add_argument("--n", type=int, default=3, help="images per attack")
    ap.add_argument("--scale", type=int, default=3, help="pixel magnification")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "attacks.png"))
    args = ap.parse_args(argv)

    reg = load_registry()
    if args.data:
        ds = reg.create("dataset", "imagefolder", root=args.data, train_size=2000)
    else:
        ds = reg.create("dataset", "synthetic", train_size=2000, test_size=500)
    train, test = ds.load()
    tiles = []
    for name in reg.names("attack"):
        attack = reg.create("attack", name)
        attack.poison_train(train, seed=0)  # some attacks (wanet) fix their trigger here
        asr = attack.poison_test(test)
        pick = torch.arange(min(args.n, len(asr)))
        poisoned = asr.images[pick].float()
        clean = test.images[test.positions(asr.ids[pick])].float()
        diff = ((poisoned - clean) * 4 + 128).clamp(0, 255)
        row = torch.cat([torch.cat([c, p, d], dim=2) for c, p, d in zip(clean, poisoned, diff)], dim=2)
        tiles.append(row)
    sep = 4
    h = tiles[0].shape[1]
    grid = torch.full((3, len(tiles) * (h + sep), tiles[0].shape[2]), 255.0)
    for i, t in enumerate(tiles):
        grid[:, i * (h + sep): i * (h + sep) + h, : t.shape[2]] = t
    grid = grid.repeat_interleave(args.scale, 1).repeat_interleave(args.scale, 2).to(torch.uint8)
    write_png(grid, args.out)
    print(f"wrote {args.out}: rows = {', '.join(reg.names('attack'))}; each triple = clean, poisoned, diff x4")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
