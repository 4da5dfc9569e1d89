"""Make ``benchmarks/data/cifar10`` (the dataset root the sweep files in ``benchmarks/sweeps``
name, relative to the repository root): a link to a CIFAR-10 image-folder tree
(``<root>/{train,test}/<class>/*.jpg``), extracted once from ``cifar10-jpeg.tar.gz`` when given
the tarball (default: ``../shared/datasets/cifar10-jpeg.tar.gz`` beside the repository).

    python benchmarks/prepare_cifar10.py                      # from ../shared
    python benchmarks/prepare_cifar10.py --data /data/cifar10 # an existing tree or tarball
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, cifar10_tree  # noqa: E402

LINK = REPO / "benchmarks" / "data" / "cifar10"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="CIFAR-10 image-folder tree or cifar10-jpeg.tar.gz (default: ../shared)")
    args = ap.parse_args(argv)
    tree = cifar10_tree(args.data).resolve()
    LINK.parent.mkdir(parents=True, exist_ok=True)
    if LINK.is_symlink() or LINK.exists():
        if LINK.resolve() == tree:
            print(f"{LINK.relative_to(REPO)} -> {tree} (already there)")
            return
        if not LINK.is_symlink():
            raise SystemExit(f"{LINK} exists and is not a link; remove it first")
        LINK.unlink()
    LINK.symlink_to(tree, target_is_directory=True)
    print(f"{LINK.relative_to(REPO)} -> {tree}")


if __name__ == "__main__":
    main()
