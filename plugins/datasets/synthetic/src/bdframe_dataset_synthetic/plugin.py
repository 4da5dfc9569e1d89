"""``synthetic``: a deterministic, generated, learnable image dataset (no files needed).

Each class has a smooth random prototype image; a sample is its class prototype, randomly
shifted, blended with a smooth random distractor image and brightness-jittered. The image intensities are kept mid-range (few
saturated pixels), so a white patch trigger is visible on every image, as on natural photos.
A small CNN learns both the classes and a patch backdoor within a few epochs, which makes it
the embedded default for quickstarts and tests.
"""

from __future__ import annotations

import attrs

from bdframe import hookimpl
from bdframe.config import in_range
from bdframe.data import DatasetInfo, ImageSet
from bdframe.interfaces import DatasetFactory


@attrs.frozen
class SyntheticConfig:
    num_classes: int = attrs.field(default=10, validator=in_range(2, 1000))
    train_size: int = attrs.field(default=5000, validator=in_range(1, 1_000_000))
    test_size: int = attrs.field(default=1000, validator=in_range(1, 1_000_000))
    image_size: int = attrs.field(default=32, validator=in_range(8, 256))
    channels: int = attrs.field(default=3, validator=in_range(1, 3))
    distractor: float = attrs.field(default=0.5, validator=in_range(0, 1),
                                    metadata={"help": "weight of the per-sample distractor image (difficulty)"})
    seed: int = attrs.field(default=0, validator=in_range(0, None))

    def check(self):
        if self.channels == 2:
            return [("channels", "must be 1 or 3, got 2")]
        return []


def _smooth(n, c, size, g, cells=4):
    import torch

    z = torch.rand(n, c, cells, cells, generator=g)
    return torch.nn.functional.interpolate(z, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


class Synthetic(DatasetFactory):
    name = "synthetic"
    Config = SyntheticConfig
    summary = "deterministic generated dataset for quickstarts and tests (no download)"

    def describe(self) -> DatasetInfo:
        c = self.config
        return DatasetInfo(num_classes=c.num_classes, channels=c.channels, height=c.image_size, width=c.image_size,
                           mean=(0.5,) * c.channels, std=(0.25,) * c.channels,
                           classes=tuple(f"class{i}" for i in range(c.num_classes)))

    def _make(self, n, split_seed, protos):
        import torch

        c = self.config
        g = torch.Generator().manual_seed(split_seed)
        labels = torch.arange(n) % c.num_classes
        labels = labels[torch.randperm(n, generator=g)]
        x = protos[labels]
        shifts = torch.randint(-3, 4, (n, 2), generator=g)
        # roll each image by its own shift (grouped by shift value: 49 groups, batched)
        for dy in range(-3, 4):
            for dx in range(-3, 4):
                sel = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
                if sel.any():
                    x[sel] = torch.roll(x[sel], shifts=(dy, dx), dims=(2, 3))
        d = _smooth(n, c.channels, c.image_size, g, cells=6)
        bright = 0.85 + 0.3 * torch.rand(n, 1, 1, 1, generator=g)
        # mid-range intensities (about 0.13-0.92), like natural photos: few saturated pixels
        x = (0.15 + 0.65 * ((1 - c.distractor) * x + c.distractor * d)) * bright
        images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
        return ImageSet(images, labels.to(torch.int64), torch.arange(n, dtype=torch.int64), self.describe().classes)

    def load(self):
        import torch

        c = self.config
        g = torch.Generator().manual_seed(c.seed)
        protos = _smooth(c.num_classes, c.channels, c.image_size, g, cells=4)
        lo = protos.amin(dim=(2, 3), keepdim=True)
        hi = protos.amax(dim=(2, 3), keepdim=True)
        protos = (protos - lo) / (hi - lo + 1e-6)  # full contrast per channel
        return self._make(c.train_size, c.seed * 2 + 1, protos), self._make(c.test_size, c.seed * 2 + 2, protos)


@hookimpl
def bdframe_register_datasets(registry):
    registry.add(Synthetic)
