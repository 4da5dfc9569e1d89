"""``corner-noise``: a fixed random-noise patch in one image corner (an example third-party attack).

Dirty-label, all-to-one: ``int(N * poison_rate)`` training images of any class, chosen by a
seeded permutation in id order, get the patch and the target label; there are no cover
samples. The patch is a ``patch_size`` x ``patch_size`` block of uniform random colours drawn
once from ``noise_seed``, so every image, and every run with the same ``noise_seed``, gets the
same trigger. Poisoned test set: the patch on every test image whose true label is not the
target, labelled with the target.

The module stays light (attrs, bdframe's config helpers and interfaces); torch is imported
inside the methods, so ``bdframe plugins`` and ``bdframe validate`` do not pay for it.
"""

from __future__ import annotations

import attrs

from bdframe import hookimpl
from bdframe.config import in_range, one_of
from bdframe.interfaces import Attack, PoisonedSet

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


@attrs.frozen
class CornerNoiseConfig:
    poison_rate: float = attrs.field(default=0.05, validator=in_range(0, 1, lo_open=True, hi_open=True),
                                     metadata={"help": "fraction of the training set poisoned"})
    target: int = attrs.field(default=0, validator=in_range(0, None), metadata={"help": "target class"})
    patch_size: int = attrs.field(default=4, validator=in_range(1, None),
                                  metadata={"help": "side of the square noise patch, in pixels"})
    corner: str = attrs.field(default="bottom-right", validator=one_of(*CORNERS),
                              metadata={"help": "image corner the patch is placed in"})
    noise_seed: int = attrs.field(default=0, validator=in_range(0, None),
                                  metadata={"help": "seed of the noise pattern (fixes the trigger)"})


class CornerNoise(Attack):
    name = "corner-noise"
    Config = CornerNoiseConfig
    summary = "fixed random-noise corner patch, dirty-label, all-to-one (example third-party plugin)"

    def check_dataset(self, info):
        c = self.config
        out = []
        if c.target >= info.num_classes:
            out.append(("target", f"must be a class index in [0, {info.num_classes - 1}], got {c.target}"))
        if c.patch_size > min(info.height, info.width):
            out.append(("patch_size", f"must be <= the image size {info.height}x{info.width}, got {c.patch_size}"))
        return out

    def patch(self, channels: int):
        """The trigger: a uint8 ``(channels, patch_size, patch_size)`` tensor, the same every call."""
        import torch

        k = self.config.patch_size
        g = torch.Generator().manual_seed(self.config.noise_seed)
        return torch.randint(0, 256, (channels, k, k), generator=g, dtype=torch.uint8)

    def _stamp(self, images, rows):
        """A copy of uint8 ``images`` (N,C,H,W) with the patch written into ``rows``."""
        c = self.config
        out = images.clone()
        _, channels, h, w = images.shape
        k = c.patch_size
        r0 = 0 if c.corner.startswith("top") else h - k
        c0 = 0 if c.corner.endswith("left") else w - k
        if len(rows):
            out[rows, :, r0:r0 + k, c0:c0 + k] = self.patch(channels)
        return out

    def poison_train(self, train, *, seed):
        import hashlib

        import torch

        from bdframe.seeding import generator

        c = self.config
        n = int(len(train) * c.poison_rate)
        order = torch.argsort(train.ids)  # choose by id, so the row order of `train` does not matter
        rows = order[torch.randperm(len(train), generator=generator(seed, "corner-noise", "select"))[:n]]
        labels = train.labels.clone()
        labels[rows] = c.target
        data = train.with_images(self._stamp(train.images, rows)).with_labels(labels)
        patch = self.patch(train.images.shape[1])
        return PoisonedSet(data=data, poison_ids=torch.sort(train.ids[rows]).values,
                           cover_ids=torch.empty(0, dtype=torch.int64),
                           meta={"trigger_sha256": hashlib.sha256(patch.numpy().tobytes()).hexdigest()[:16],
                                 "target": c.target, "corner": c.corner})

    def poison_test(self, test):
        import torch

        c = self.config
        sub = test.subset(test.labels != c.target)
        return sub.with_images(self._stamp(sub.images, torch.arange(len(sub)))).with_labels(
            torch.full((len(sub),), c.target, dtype=torch.int64))


@hookimpl
def bdframe_register_attacks(registry):
    registry.add(CornerNoise)
