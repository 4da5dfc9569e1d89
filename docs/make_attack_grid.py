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
from typing import Optional, Sequence

import torch

from bdframe import plots


def image_grid(images, path: Path, *, row_labels: Sequence[str], col_labels: Sequence[str],
               title: Optional[str] = None, caption: Optional[str] = None, group: Optional[int] = None,
               cell: float = 1.0) -> Optional[dict]:
    """A grid of images with a label per row (left) and per column (top).

    ``images[r][c]`` is an RGB image, a ``(3, H, W)`` tensor or ``(H, W, 3)`` array with values
    in 0-255; ``group`` puts a gap after every ``group`` columns (e.g. 3 for clean / poisoned /
    difference triples); ``cell`` is the width of one image in inches (at 100 dpi). Pixels are
    shown unsmoothed. Returns ``{"file", "title", "rows", "columns", "size_px"}`` or ``None``
    without matplotlib.
    """
    if not plots.available():
        return None
    import matplotlib as mpl
    import numpy as np

    def hwc(img):
        a = np.asarray(img.detach().cpu() if hasattr(img, "detach") else img, dtype=np.float64)
        if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
            a = a.transpose(1, 2, 0)
        if a.shape[-1] == 1:
            a = a.repeat(3, axis=-1)
        return np.clip(a, 0, 255).astype(np.uint8)

    n_rows, n_cols = len(images), max(len(r) for r in images)
    gap = 0.12
    ratios, col_of = [], []
    for c in range(n_cols):
        if group and c and c % group == 0:
            ratios.append(gap)
        col_of.append(len(ratios))
        ratios.append(1.0)
    label_w = 1.5
    width = label_w + cell * sum(ratios)
    height = cell * n_rows * 1.04 + (0.45 if title else 0) + 0.3 + (0.35 if caption else 0)
    with mpl.rc_context(plots._STYLE):
        fig = plots._figure(width, height)
        fig.set_layout_engine("none")
        left = label_w / width
        top = 1 - ((0.45 if title else 0.05) + 0.3) / height
        bottom = (0.35 if caption else 0.05) / height
        gs = fig.add_gridspec(n_rows, len(ratios), width_ratios=ratios, left=left, right=0.995, top=top,
                              bottom=bottom, wspace=0.04, hspace=0.04)
        for r, row in enumerate(images):
            for c, img in enumerate(row):
                ax = fig.add_subplot(gs[r, col_of[c]])
                ax.imshow(hwc(img), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                for sp in ax.spines.values():
                    sp.set_visible(False)
                if r == 0:
                    ax.set_title(col_labels[c], fontsize=10, pad=4)
                if c == 0:
                    ax.set_ylabel(row_labels[r], rotation=0, ha="right", va="center", fontsize=12, labelpad=8)
        if title:
            fig.suptitle(title, x=0.5, y=1 - 0.08 / height, va="top")
        if caption:
            fig.text(0.5, 0.08 / height, caption, ha="center", va="bottom", fontsize=10, color="#333333")
        plots._save(fig, path)
        size = [int(round(width * fig.dpi)), int(round(height * fig.dpi))]
    return {"file": Path(path).name, "title": title, "rows": list(row_labels), "columns": list(col_labels),
            "size_px": size}


def main(argv=None) -> int:
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
    drawn = image_grid(
        rows, Path(args.out), row_labels=names, col_labels=["clean", "poisoned", "difference x4"] * n, group=3,
        cell=args.cell, title=f"Backdoor attacks (defaults) on {source}",
        caption="difference x4 = 4 \u00d7 |poisoned \u2212 clean| per colour channel, clipped (black = unchanged)")
    print(f"wrote {args.out} ({drawn['size_px'][0]}x{drawn['size_px'][1]} px): rows = {', '.join(names)}; "
          f"columns = clean, poisoned, difference x4")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
