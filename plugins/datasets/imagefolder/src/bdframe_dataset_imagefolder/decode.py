"""Decoding image files into the in-memory uint8 format, with an on-disk cache: the reader of
the ``imagefolder`` dataset. The cache key covers the absolute root, the split, the target
size and every file's relative path, size and modification time, so a changed tree is decoded
again.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bdframe.errors import UserError
from bdframe.progress import Progress

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def cache_dir() -> Path:
    return Path(os.environ.get("BDFRAME_CACHE_DIR") or Path.home() / ".cache" / "bdframe")


def list_classes(split_dir: Path) -> list[str]:
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def list_files(split_dir: Path, classes: list[str]) -> list[tuple[Path, int]]:
    files = []
    for label, cls in enumerate(classes):
        d = split_dir / cls
        if not d.is_dir():
            continue
        for f in sorted(d.iterdir()):
            if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file():
                files.append((f, label))
    return files


def decode_file(path: Path, size: tuple[int, int] | None, channels: int = 3) -> torch.Tensor:
    """One image as uint8 (C,H,W), converted to RGB (or grayscale if channels=1), resized if needed."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    try:
        img = decode_image(read_file(str(path)), mode=mode)
    except Exception:
        raise UserError(f"{str(path)!r} is not a readable image (PNG, JPEG, GIF or WebP expected); "
                        f"remove it or fix it") from None
    if size is not None and tuple(img.shape[1:]) != tuple(size):
        img = torch.nn.functional.interpolate(img[None].float(), size=size, mode="bilinear", antialias=True,
                                              align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
    return img


def load_split(root: Path, split: str, classes: list[str], *, size: tuple[int, int] | None, channels: int = 3,
               use_cache: bool = True, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    split_dir = Path(root) / split
    files = list_files(split_dir, classes)
    if not files:
        raise UserError(f"no images found under {str(split_dir)!r} (expected {split}/<class>/<image file>)")
    h = hashlib.sha256()
    h.update(f"{Path(root).resolve()}|{split}|{size}|{channels}|v1".encode())
    for f, label in files:
        st = f.stat()
        h.update(f"{f.relative_to(split_dir)}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    cache = cache_dir() / f"imagefolder-{h.hexdigest()[:24]}.pt"
    if use_cache and cache.exists():
        try:
            d = torch.load(cache, weights_only=True)
            return d["images"], d["labels"]
        except Exception:
            pass  # a corrupt cache is rebuilt
    if size is None:
        first = decode_file(files[0][0], None, channels)
        size = tuple(first.shape[1:])
    out = torch.empty((len(files), channels, size[0], size[1]), dtype=torch.uint8)
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)

    def work(i):
        out[i] = decode_file(files[i][0], size, channels)

    with Progress(len(files), f"decoding {split_dir}", unit="img", enabled=None if progress else False) as bar:
        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as ex:
            for _ in ex.map(work, range(len(files)), chunksize=256):
                bar.update(1)
    if use_cache:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp")
            torch.save({"images": out, "labels": labels}, tmp)
            os.replace(tmp, cache)
        except OSError:
            pass  # caching is an optimisation; a read-only home must not fail the run
    return out, labels
