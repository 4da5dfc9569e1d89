"""``physicalba``: backdoor attack in the physical world (Li et al., ICLR-W 2021), following
BackdoorBox ``PhysicalBA``; see docs/attacks.md, PhysicalBA.

Dirty-label, all-to-one BadNets: a random ``int(N * poison_rate)`` training images of any
class get a patch trigger by mask blend (``x' = x + alpha * m * (t - x)``) and the target
label. Default trigger (the MeCa "Firefox trigger"): the built-in 13x13 Firefox-icon
substitute in the top-right corner (rows 1-13, cols 18-30 on 32x32; mask = its non-black
pixels), alpha 1. ``pattern = "firefox-icon"`` uses the 8x8 icon at ``position`` instead,
``"white-square"`` a ``patch_size`` white square; ``trigger_image``/``mask_image`` a user file.

Physical transformations, applied at training time only through the poisoned set's
``ImageSet.transform`` hook (batched tensor ops, after the trigger, before the trainer's own
augmentation), in order: horizontal flip (p = ``flip_p``), ColorJitter(brightness, contrast)
with factors uniform in [1 - b, 1 + b] applied in random order per sample, and
RandomAffine(``degrees``, translate = ``translate`` of the width/height rounded to whole
pixels, scale uniform in [``scale_min``, ``scale_max``], nearest interpolation, zero fill).
``transform_on = "all"`` (BackdoorBox, default) transforms every training sample,
``"poison"`` only the poisoned ones. Poisoned test set: the plain trigger, without
transformations, on every non-target test image, labelled with the target.
"""

from __future__ import annotations

from typing import Any, Optional

import attrs

from bdframe import hookimpl
from bdframe.config import in_range, one_of
from bdframe.interfaces import PoisonedSet
from bdframe_attack_common import POSITIONS
from bdframe_attack_common.base import MaskTriggerAttack, select_rows


@attrs.frozen
class PhysicalBAConfig:
    poison_rate: float = attrs.field(default=0.05, validator=in_range(0, 1, lo_open=True, hi_open=True),
                                     metadata={"help": "fraction of the training set poisoned"})
    target: int = attrs.field(default=1, validator=in_range(0, None), metadata={"help": "target class"})
    pattern: str = attrs.field(default="firefox-corner", validator=one_of("firefox-corner", "firefox-icon",
                                                                          "white-square"), metadata={
        "help": "built-in trigger: 13x13 Firefox icon top-right (MeCa), 8x8 Firefox icon at position, "
                "or a white square"})
    position: str = attrs.field(default="bottom-right", validator=one_of(*POSITIONS),
                                metadata={"help": "corner of the firefox-icon / white-square patterns"})
    patch_size: int = attrs.field(default=3, validator=in_range(1, None),
                                  metadata={"help": "side of the white-square pattern"})
    alpha: float = attrs.field(default=1.0, validator=in_range(0, 1, lo_open=True),
                               metadata={"help": "opacity of the trigger under its mask"})
    trigger_image: Optional[str] = attrs.field(default=None, metadata={
        "help": "full-frame trigger image (PNG/JPEG), resized to the data; replaces the built-in pattern"})
    mask_image: Optional[str] = attrs.field(default=None, metadata={
        "help": "mask for trigger_image (first channel; default: its non-black pixels)"})
    transform_on: str = attrs.field(default="all", validator=one_of("all", "poison"), metadata={
        "help": "training samples that get the physical transformations: all (BackdoorBox) or poison only"})
    flip_p: float = attrs.field(default=0.5, validator=in_range(0, 1), metadata={"help": "horizontal flip probability"})
    brightness: float = attrs.field(default=0.2, validator=in_range(0, 1),
                                    metadata={"help": "ColorJitter brightness: factor uniform in [1-b, 1+b]"})
    contrast: float = attrs.field(default=0.2, validator=in_range(0, 1),
                                  metadata={"help": "ColorJitter contrast: factor uniform in [1-c, 1+c]"})
    degrees: float = attrs.field(default=10.0, validator=in_range(0, 180),
                                 metadata={"help": "RandomAffine rotation, uniform in [-degrees, degrees]"})
    translate: float = attrs.field(default=0.1, validator=in_range(0, 1),
                                   metadata={"help": "RandomAffine shift, up to this fraction of width/height"})
    scale_min: float = attrs.field(default=0.8, validator=in_range(0, None, lo_open=True),
                                   metadata={"help": "RandomAffine scale lower bound"})
    scale_max: float = attrs.field(default=0.9, validator=in_range(0, None, lo_open=True),
                                   metadata={"help": "RandomAffine scale upper bound"})

    def check(self):
        out = []
        if self.scale_min > self.scale_max:
            out.append(("scale_min", f"must be <= scale_max ({self.scale_max}), got {self.scale_min}"))
        if self.mask_image and not self.trigger_image:
            out.append(("mask_image", "needs trigger_image"))
        return out


def physical(x, g, c: PhysicalBAConfig):
    """The physical transformations on float images (B,C,H,W) in [0,1]; parameters drawn from
    the CPU generator ``g`` (a fixed number of draws per call)."""
    import torch

    b, ch, h, w = x.shape
    dev = x.device
    # draw every parameter first, on the CPU
    flip = torch.rand(b, generator=g) < c.flip_p
    bf = 1 - c.brightness + 2 * c.brightness * torch.rand(b, generator=g)
    cf = 1 - c.contrast + 2 * c.contrast * torch.rand(b, generator=g)
    brightness_first = torch.rand(b, generator=g) < 0.5
    angle = (torch.rand(b, generator=g, dtype=torch.float64) * 2 - 1) * c.degrees
    tx = torch.round((torch.rand(b, generator=g, dtype=torch.float64) * 2 - 1) * c.translate * w)
    ty = torch.round((torch.rand(b, generator=g, dtype=torch.float64) * 2 - 1) * c.translate * h)
    scale = c.scale_min + (c.scale_max - c.scale_min) * torch.rand(b, generator=g, dtype=torch.float64)

    # 1. horizontal flip
    x = torch.where(flip.to(dev)[:, None, None, None], x.flip(3), x)

    # 2. ColorJitter(brightness, contrast), random order per sample (torchvision semantics)
    def bright(z):
        return (z * bf.to(dev, z.dtype)[:, None, None, None]).clamp(0, 1)

    def contr(z):
        grey = z if ch == 1 else (0.2989 * z[:, 0] + 0.587 * z[:, 1] + 0.114 * z[:, 2])[:, None]
        mean = grey.mean(dim=(1, 2, 3), keepdim=True)
        f = cf.to(dev, z.dtype)[:, None, None, None]
        return (f * z + (1 - f) * mean).clamp(0, 1)

    x = torch.where(brightness_first.to(dev)[:, None, None, None], contr(bright(x)), bright(contr(x)))

    # 3. RandomAffine
    return affine(x, angle, tx, ty, scale)


def affine(x, angle, tx, ty, scale):
    """Rotate by ``angle`` degrees, scale and shift by (tx, ty) pixels about the image centre,
    per sample (1-D tensors of length B), nearest interpolation, zero fill (torchvision's
    ``F.affine`` without shear). Output pixel p samples the input at (1/s) R(-a) (p - t), in
    grid_sample's normalised coordinates (align_corners=False: pixel centres)."""
    import math

    import torch
    import torch.nn.functional as F

    b, ch, h, w = x.shape
    rad = angle.to(torch.float64) * math.pi / 180
    scale = scale.to(torch.float64)
    cos, sin = torch.cos(rad) / scale, torch.sin(rad) / scale
    tx, ty = tx.to(torch.float64), ty.to(torch.float64)
    # inverse map in centred pixel coordinates, rows [cos, sin, .] and [-sin, cos, .]
    theta = torch.stack([torch.stack([cos, sin, -(cos * tx + sin * ty)], 1),
                         torch.stack([-sin, cos, -(-sin * tx + cos * ty)], 1)], 1).to(torch.float32)  # (b,2,3)
    # the same float32 operation order as torchvision's grid, so nearest-neighbour ties break alike
    xs = torch.arange(w, dtype=torch.float32) - w * 0.5 + 0.5
    ys = torch.arange(h, dtype=torch.float32) - h * 0.5 + 0.5
    base = torch.stack([xs.expand(h, w), ys[:, None].expand(h, w), torch.ones(h, w)], -1).view(1, h * w, 3)
    rescaled = theta.transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h], dtype=torch.float32)
    grid = base.expand(b, h * w, 3).bmm(rescaled).view(b, h, w, 2).to(x.device, x.dtype)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


@attrs.frozen(eq=False)
class PhysicalTransform:
    """The ``ImageSet.transform`` of a PhysicalBA poisoned set: physical transformations on the
    samples whose id is in ``ids`` (None: every sample), after ``inner`` (an earlier transform)."""

    config: PhysicalBAConfig
    ids: Any = None
    inner: Any = None

    def __call__(self, x, ids, g):
        import torch

        if self.inner is not None:
            x = self.inner(x, ids, g)
        if self.ids is None:
            return physical(x, g, self.config)
        sel = torch.isin(torch.as_tensor(ids).cpu(), self.ids)
        if not bool(sel.any()):
            return x
        x = x.clone()
        sel = sel.to(x.device)
        x[sel] = physical(x[sel], g, self.config)
        return x


class PhysicalBA(MaskTriggerAttack):
    name = "physicalba"
    Config = PhysicalBAConfig
    summary = "PhysicalBA: patch trigger (Firefox icon) + train-time physical transformations, all-to-one"

    def trigger_problems(self, info):
        from bdframe_attack_common.triggers import patch_trigger_problems

        return patch_trigger_problems(self.config, info)

    def builtin_trigger(self, channels: int, height: int, width: int):
        from bdframe_attack_common import patterns

        c = self.config
        if c.pattern == "white-square":
            return patterns.get("white-square", channels, height, width, size=c.patch_size, position=c.position)
        if c.pattern == "firefox-icon":
            return patterns.get("firefox-icon", channels, height, width, position=c.position)
        return patterns.get("firefox-corner", channels, height, width)

    def poison_train(self, train, *, seed):
        import torch

        from bdframe.seeding import generator

        c = self.config
        (rows,) = select_rows(train, [int(len(train) * c.poison_rate)], generator(seed, "physicalba", "select"))
        poison_ids = train.ids[rows].clone()
        transform = PhysicalTransform(c, ids=None if c.transform_on == "all" else poison_ids.clone(),
                                      inner=train.transform)
        data = attrs.evolve(self.relabelled(train, self.stamp(train.images, rows), rows), transform=transform)
        return PoisonedSet(data=data, poison_ids=poison_ids, cover_ids=torch.empty(0, dtype=torch.int64),
                           meta={"trigger_sha256": self.trigger_sha256(train.images), "target": c.target,
                                 "transform_on": c.transform_on})

    def poison_test(self, test):
        # the test trigger comes without physical transformations
        return attrs.evolve(super().poison_test(test), transform=None)


@hookimpl
def bdframe_register_attacks(registry):
    registry.add(PhysicalBA)
