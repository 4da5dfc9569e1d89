"""Speed of the contrastive-view augmentation (crop, flip, colour jitter, grayscale, blur) on
batches of 32x32 images, three ways, measured in one process: bdframe's batched
``ContrastiveViews``, torchvision.transforms.v2 applied image by image (its transforms draw one
set of parameters per call, so per-image randomness means a call per image), and kornia's
batched augmentations (if kornia is installed: ``pip install kornia``). Prints a table (ms per
batch, images/s, ratio to bdframe's) and writes JSON.

    python benchmarks/augment_speed.py                 # batch 512, 2 threads
    python benchmarks/augment_speed.py --threads 1 --batch 256
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, print_table, write_json  # noqa: E402


def candidates():
    from bdframe.augment import ContrastiveViews

    ours = ContrastiveViews()
    g = torch.Generator().manual_seed(0)
    out = {"bdframe ContrastiveViews (batched)": lambda x: ours(x, g)}

    import torchvision.transforms.v2 as T

    tv = T.Compose([T.RandomResizedCrop(32, scale=(0.2, 1.0), antialias=True), T.RandomHorizontalFlip(),
                    T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(0.2),
                    T.RandomApply([T.GaussianBlur(3, sigma=(0.1, 2.0))], p=0.5)])
    out["torchvision v2 (per image)"] = lambda x: torch.stack([tv(img) for img in x])
    try:
        import kornia.augmentation as K
    except ImportError:
        print("kornia not installed: its row is skipped", file=sys.stderr)
    else:
        kn = torch.nn.Sequential(K.RandomResizedCrop((32, 32), scale=(0.2, 1.0)), K.RandomHorizontalFlip(),
                                 K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8), K.RandomGrayscale(p=0.2),
                                 K.RandomGaussianBlur((3, 3), (0.1, 2.0), p=0.5))
        out["kornia (batched)"] = kn
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "augment_speed.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    x = torch.rand(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    rows = []
    for name, f in candidates().items():
        f(x)  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            f(x)
            best = min(best, time.perf_counter() - t)
        rows.append({"implementation": name, "ms_per_batch": 1000 * best, "images_per_s": args.batch / best})
    base = rows[0]["ms_per_batch"]
    for r in rows:
        r["x_time"] = r["ms_per_batch"] / base
    print(f"\ncontrastive views of {args.batch} 32x32 RGB images, {args.threads} threads, best of {args.repeats}")
    print_table(rows, [("implementation", "implementation", "{}"), ("ms_per_batch", "ms/batch", "{:.1f}"),
                       ("images_per_s", "img/s", "{:,.0f}"), ("x_time", "time x", "{:.2f}")])
    write_json(Path(args.out), {"benchmark": "augment_speed", "batch": args.batch, "threads": args.threads,
                                "torch": torch.__version__, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
