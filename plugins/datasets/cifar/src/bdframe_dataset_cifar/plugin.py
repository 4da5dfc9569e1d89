"""``cifar10`` and ``cifar100`` from the standard torchvision folder format under ``root``
(``cifar-10-batches-py/`` or ``cifar-100-python/``), downloaded there when
``download = true`` and the files are missing. Reading uses torchvision's dataset classes,
so an existing torchvision download is picked up as is."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import attrs

from bdframe import hookimpl
from bdframe.config import in_range
from bdframe.errors import UserError
from bdframe.interfaces import DatasetFactory


@attrs.frozen
class CifarConfig:
    root: str = attrs.field(default="", metadata={"help": "folder holding (or to receive) the torchvision files"})
    download: bool = False
    train_size: Optional[int] = attrs.field(default=None, validator=in_range(1, None),
                                            metadata={"help": "class-balanced deterministic subset of the training split"})
    subset_seed: int = 0

    def check(self):
        return [] if self.root else [("root", "is required: the folder holding the torchvision CIFAR files")]


class _Cifar(DatasetFactory):
    Config = CifarConfig
    folder = ""
    num_classes = 10
    mean: tuple = ()
    std: tuple = ()

    def _tv_class(self):
        import torchvision

        return torchvision.datasets.CIFAR10 if self.num_classes == 10 else torchvision.datasets.CIFAR100

    def describe(self):
        from bdframe.data import DatasetInfo

        root = Path(self.config.root).expanduser()
        if not self.config.download and not (root / self.folder).is_dir():
            raise UserError(f"root: {self.name} not found: {str(root / self.folder)!r} does not exist; "
                            f"set download = true to fetch it, or point root at the folder that contains "
                            f"{self.folder}/")
        return DatasetInfo(self.num_classes, 3, 32, 32, self.mean, self.std, getattr(self, "_classes", ()))

    def load(self):
        import torch

        from bdframe.data import ImageSet
        from bdframe.scoring import balanced_draw

        self.describe()
        cls = self._tv_class()
        root = str(Path(self.config.root).expanduser())
        out = []
        for train in (True, False):
            try:
                ds = cls(root, train=train, download=self.config.download)
            except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
                raise UserError(f"root: cannot read {self.name} under {root!r}: {e}") from None
            images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
            labels = torch.as_tensor(ds.targets, dtype=torch.int64)
            self._classes = tuple(ds.classes)
            out.append(ImageSet(images, labels, torch.arange(len(labels), dtype=torch.int64), tuple(ds.classes)))
        train, test = out
        if self.config.train_size is not None:
            train = train.subset(balanced_draw(train, self.config.train_size, seed=self.config.subset_seed))
        return train, test


class Cifar10(_Cifar):
    name = "cifar10"
    summary = "CIFAR-10 (torchvision format under root; download = true fetches it)"
    folder = "cifar-10-batches-py"
    num_classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)


class Cifar100(_Cifar):
    name = "cifar100"
    summary = "CIFAR-100 (torchvision format under root; download = true fetches it)"
    folder = "cifar-100-python"
    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)


@hookimpl
def bdframe_register_datasets(registry):
    registry.add(Cifar10)
    registry.add(Cifar100)
