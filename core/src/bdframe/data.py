"""The in-memory data pipeline (the hot path of every training-time defense).

A split is held as one ``uint8`` tensor ``(N, C, H, W)`` with int64 labels and stable int64
sample ids. Triggers are applied to whole tensors once; training batches are cut from the
tensor, converted to float in [0, 1] and augmented as batched tensor ops (random crop with
zero padding, horizontal flip) on the training device. Normalisation is the model wrapper's
job, so everything here is in pixel space.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import attrs
import torch

# A batch transform takes float images in [0,1] on the device, their sample ids and a CPU
# generator, and returns transformed images. Attacks use it for train-time effects that are
# part of how the poisoned data is produced (e.g. PhysicalBA's physical transformations).
BatchTransform = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


@attrs.frozen
class DatasetInfo:
    """What components need to know about a dataset without loading it."""

    num_classes: int
    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] = ()


@attrs.define(eq=False)
class ImageSet:
    """A split: ``images`` uint8 (N,C,H,W), ``labels`` int64 (N,), ``ids`` int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor
    classes: tuple[str, ...] = ()
    transform: Optional[BatchTransform] = None

    def __attrs_post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N,C,H,W), got {self.images.dtype} {tuple(self.images.shape)}")
        n = self.images.shape[0]
        if self.labels.shape != (n,) or self.ids.shape != (n,):
            raise ValueError("labels and ids must have shape (N,)")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else int(self.labels.max().item()) + 1

    def subset(self, index: torch.Tensor) -> "ImageSet":
        """Rows selected by a boolean mask or a tensor of positions."""
        return attrs.evolve(self, images=self.images[index], labels=self.labels[index], ids=self.ids[index])

    def positions(self, ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Positions of the given ids (error if one is missing)."""
        ids = torch.as_tensor(ids, dtype=torch.int64)
        order = torch.argsort(self.ids)
        sorted_ids = self.ids[order]
        pos = torch.searchsorted(sorted_ids, ids)
        pos = pos.clamp(max=len(sorted_ids) - 1)
        if len(ids) and not torch.equal(sorted_ids[pos], ids):
            raise KeyError("some ids are not in this set")
        return order[pos]

    def select_ids(self, ids) -> "ImageSet":
        return self.subset(self.positions(ids))

    def contains(self, ids) -> torch.Tensor:
        """Boolean mask over this set's rows: is the row's id in ``ids``."""
        return torch.isin(self.ids, torch.as_tensor(ids, dtype=torch.int64))

    def with_labels(self, labels: torch.Tensor) -> "ImageSet":
        return attrs.evolve(self, labels=labels.to(torch.int64).clone())

    def with_images(self, images: torch.Tensor) -> "ImageSet":
        return attrs.evolve(self, images=images)

    @staticmethod
    def concat(a: "ImageSet", b: "ImageSet") -> "ImageSet":
        return attrs.evolve(a, images=torch.cat([a.images, b.images]), labels=torch.cat([a.labels, b.labels]),
                            ids=torch.cat([a.ids, b.ids]))


def to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float [0,1] -> uint8 with rounding (the storage format of every poisoned set)."""
    return images.clamp(0.0, 1.0).mul(255.0).round_().to(torch.uint8)


@attrs.frozen
class Augment:
    """Batched train-time augmentation: random crop with zero padding, horizontal flip."""

    crop_padding: int = 4
    flip: bool = True

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        b, c, h, w = x.shape
        if self.flip:
            flip = (torch.rand(b, generator=g) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        p = self.crop_padding
        if p > 0:
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            oy = torch.randint(0, 2 * p + 1, (b,), generator=g).to(x.device)
            ox = torch.randint(0, 2 * p + 1, (b,), generator=g).to(x.device)
            rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
            cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
            bi = torch.arange(b, device=x.device)[:, None, None, None]
            ci = torch.arange(c, device=x.device)[None, :, None, None]
            x = padded[bi, ci, rows, cols]
        return x


class Batches:
    """Iterate over an :class:`ImageSet` in batches of float images on ``device``.

    The uint8 tensor is moved to the device once; each batch is indexed, converted and
    augmented there. ``generator`` drives the shuffle and the augmentation, so the sequence
    of batches is a pure function of its seed.
    """

    def __init__(self, data: ImageSet, batch_size: int, *, device: torch.device | str = "cpu",
                 shuffle: bool = False, generator: torch.Generator | None = None,
                 augment: Augment | None = None, drop_last: bool = False,
                 apply_transform: bool = True):
        self.data = data
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.shuffle = shuffle
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.augment = augment
        self.drop_last = drop_last
        self.apply_transform = apply_transform
        self._images = data.images.to(self.device, non_blocking=True)
        self._labels = data.labels.to(self.device)
        self._ids = data.ids

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        n = len(self.data)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            dev_idx = idx.to(self.device)
            x = self._images[dev_idx].float().div_(255.0)
            ids = self._ids[idx]
            if self.apply_transform and self.data.transform is not None:
                x = self.data.transform(x, ids, self.generator)
            if self.augment is not None:
                x = self.augment(x, self.generator)
            yield x, self._labels[dev_idx], ids


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of a uint8 (N,C,H,W) tensor, in [0,1] units."""
    x = images.to(torch.float64).div(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3))
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)
