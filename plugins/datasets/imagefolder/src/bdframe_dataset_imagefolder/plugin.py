"""``imagefolder``: ``<root>/train/<class>/*.jpg`` and ``<root>/test/<class>/*.jpg``.

Classes are the sub-folders of ``train/`` in sorted order (label = index). Sample ids are
positions in the sorted (class, file name) order of each split, so they are stable for a
given tree. Decoded splits are cached (see :mod:`bdframe_dataset_imagefolder.decode`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import attrs

from bdframe import hookimpl
from bdframe.config import in_range
from bdframe.errors import UserError
from bdframe.interfaces import DatasetFactory


@attrs.frozen
class ImageFolderConfig:
    root: str = attrs.field(default="", metadata={"help": "folder holding train/ and test/"})
    train_dir: str = "train"
    test_dir: str = "test"
    image_size: Optional[int] = attrs.field(default=None, validator=in_range(4, 4096),
                                            metadata={"help": "resize to this square size (default: first image's size)"})
    channels: int = attrs.field(default=3, validator=in_range(1, 3))
    train_size: Optional[int] = attrs.field(default=None, validator=in_range(1, None),
                                            metadata={"help": "class-balanced deterministic subset of the training split"})
    subset_seed: int = 0
    mean: Optional[tuple[float, ...]] = attrs.field(default=None, metadata={"help": "default: computed on train"})
    std: Optional[tuple[float, ...]] = None
    cache: bool = True

    def check(self):
        out = []
        if not self.root:
            out.append(("root", "is required: the folder holding train/ and test/"))
        if self.channels == 2:
            out.append(("channels", "must be 1 or 3, got 2"))
        for f in ("mean", "std"):
            v = getattr(self, f)
            if v is not None and len(v) != self.channels:
                out.append((f, f"needs {self.channels} values, got {len(v)}"))
        return out


class ImageFolder(DatasetFactory):
    name = "imagefolder"
    Config = ImageFolderConfig
    summary = "any folder tree root/{train,test}/<class>/<image>"

    def _dirs(self):
        root = Path(self.config.root).expanduser()
        if not root.is_dir():
            raise UserError(f"root: dataset folder {str(root)!r} does not exist")
        tr, te = root / self.config.train_dir, root / self.config.test_dir
        for d, key in ((tr, "train_dir"), (te, "test_dir")):
            if not d.is_dir():
                raise UserError(f"{key}: {str(d)!r} does not exist (expected <root>/{d.name}/<class>/<image>)")
        return root, tr, te

    def _classes(self):
        from bdframe_dataset_imagefolder.decode import list_classes

        _, tr, te = self._dirs()
        classes = list_classes(tr)
        if not classes:
            raise UserError(f"root: {str(tr)!r} has no class sub-folders")
        extra = sorted(set(list_classes(te)) - set(classes))
        if extra:
            raise UserError(f"test_dir: classes {extra} are in {str(te)!r} but not in {str(tr)!r}")
        return classes

    def describe(self):
        from bdframe.data import DatasetInfo
        from bdframe_dataset_imagefolder.decode import IMAGE_EXTENSIONS, decode_file

        c = self.config
        classes = self._classes()
        if c.image_size is not None:
            h = w = c.image_size
        else:
            _, tr, _ = self._dirs()
            first = next((f for f in sorted((tr / classes[0]).iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS), None)
            if first is None:
                raise UserError(f"root: no images in {str(tr / classes[0])!r}")
            h, w = decode_file(first, None, c.channels).shape[1:]
        # statistics computed on the training split once it is loaded; neutral before that
        stats = getattr(self, "_stats", ((0.5,) * c.channels, (0.25,) * c.channels))
        mean = c.mean or stats[0]
        std = c.std or stats[1]
        return DatasetInfo(len(classes), c.channels, int(h), int(w), tuple(mean), tuple(std), tuple(classes))

    def sample_files(self, split: str):
        """``{id: "train/<class>/<file>"}``: ids are positions in the sorted (class, file) order,
        as :meth:`load` assigns them (before any ``train_size`` subset, which keeps ids)."""
        from bdframe_dataset_imagefolder.decode import list_files

        root, tr, te = self._dirs()
        d = tr if split == "train" else te
        files = list_files(d, self._classes())
        return {i: f.relative_to(root).as_posix() for i, (f, _) in enumerate(files)}

    def load(self):
        import torch

        from bdframe.data import DatasetInfo, ImageSet, channel_stats
        from bdframe.scoring import balanced_draw
        from bdframe_dataset_imagefolder.decode import load_split

        c = self.config
        root, tr, te = self._dirs()
        classes = self._classes()
        size = (c.image_size, c.image_size) if c.image_size else None
        xtr, ytr = load_split(root, c.train_dir, classes, size=size, channels=c.channels, use_cache=c.cache)
        size = tuple(xtr.shape[2:])
        xte, yte = load_split(root, c.test_dir, classes, size=size, channels=c.channels, use_cache=c.cache)
        train = ImageSet(xtr, ytr, torch.arange(len(ytr), dtype=torch.int64), tuple(classes))
        test = ImageSet(xte, yte, torch.arange(len(yte), dtype=torch.int64), tuple(classes))
        if c.train_size is not None:
            train = train.subset(balanced_draw(train, c.train_size, seed=c.subset_seed))
        if c.mean is None or c.std is None:
            mean, std = channel_stats(train.images)
            self._stats = (c.mean or mean, c.std or std)
        return train, test


@hookimpl
def bdframe_register_datasets(registry):
    registry.add(ImageFolder)
