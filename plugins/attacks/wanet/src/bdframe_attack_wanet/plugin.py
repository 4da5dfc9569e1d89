"""``wanet``: warping-based backdoor (Nguyen & Tran 2021), static poisoning as in
backdoor-toolbox; see docs/attacks.md, WaNet.

Dirty-label, all-to-one. One random permutation of the training set (in id order): the first
``int(N * poison_rate)`` images are warped with the fixed field ``grid`` and relabelled to the
target; the next ``int(N * cover_rate)`` ("noise mode" covers) are warped with
``grid + u / H`` (u uniform in [-1, 1], shape (H, W, 2)) and keep their true labels.

The field (k = 4, s = 0.5, grid_rescale = 1, identical in backdoor-toolbox, BackdoorBox and
BackdoorBench): ``ins`` uniform(-1, 1) of shape (1, 2, k, k), divided by its mean absolute
value, bicubic-upsampled to H x W with align_corners=True (``noise_grid``); ``identity_grid``
from ``linspace(-1, 1)`` with channel 0 = column (x) and channel 1 = row (y);
``grid = clamp((identity + s * noise_grid / H) * grid_rescale, -1, 1)``; images are warped with
``grid_sample(bilinear, zero padding, align_corners=True)``.

The field is drawn once from ``grid_seed``; by default that seed is derived from the seed
``poison_train`` gets, so each run has its own field, and it is recorded in
``PoisonedSet.meta["grid_seed"]``: ``poison_test`` warps with the same field, and the field can
be rebuilt later with ``grid_seed = meta["grid_seed"]``. ``noise = "shared"`` (backdoor-toolbox,
the default) uses one u for all covers, ``"per-sample"`` (BackdoorBox) one u per cover image.
Poisoned test set: every non-target test image warped with ``grid``, labelled with the target.
Warped images are rounded to uint8 like every stored poisoned set (toolbox keeps floats).
"""

from __future__ import annotations

from typing import Optional

import attrs

from bdframe import hookimpl
from bdframe.config import in_range, one_of
from bdframe.interfaces import PoisonedSet
from bdframe_attack_common.base import TriggerAttack, select_rows


@attrs.frozen
class WaNetConfig:
    poison_rate: float = attrs.field(default=0.05, validator=in_range(0, 1, lo_open=True, hi_open=True),
                                     metadata={"help": "fraction of the training set warped and relabelled"})
    cover_rate: float = attrs.field(default=0.05, validator=in_range(0, 1, hi_open=True), metadata={
        "help": "fraction of the training set warped with the noisy field, true labels kept (noise mode)"})
    target: int = attrs.field(default=1, validator=in_range(0, None), metadata={"help": "target class"})
    k: int = attrs.field(default=4, validator=in_range(1, None),
                         metadata={"help": "control grid size of the random warping field"})
    s: float = attrs.field(default=0.5, validator=in_range(0, None), metadata={"help": "warping strength"})
    grid_rescale: float = attrs.field(default=1.0, validator=in_range(0, None, lo_open=True),
                                      metadata={"help": "scale applied to the warped grid before clamping"})
    noise: str = attrs.field(default="shared", validator=one_of("shared", "per-sample"), metadata={
        "help": "noise of the cover warps: one draw for all covers (toolbox) or one per cover (BackdoorBox)"})
    grid_seed: Optional[int] = attrs.field(default=None, validator=in_range(0, None), metadata={
        "help": "seed of the warping field (default: derived from the run's attack seed)"})

    def check(self):
        if self.poison_rate + self.cover_rate > 1:
            return [("cover_rate", f"poison_rate + cover_rate must be <= 1, got "
                                   f"{self.poison_rate} + {self.cover_rate}")]
        return []


def warp_field(height: int, width: int, k: int, s: float, grid_rescale: float, seed: int):
    """``(identity_grid, noise_grid, grid)``, each (1, H, W, 2), for field seed ``seed``."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(int(seed))
    ins = torch.rand(1, 2, k, k, generator=g) * 2 - 1
    ins = ins / ins.abs().mean()
    noise_grid = F.interpolate(ins, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    ys = torch.linspace(-1, 1, steps=height)
    xs = torch.linspace(-1, 1, steps=width)
    row, col = torch.meshgrid(ys, xs, indexing="ij")
    identity_grid = torch.stack((col, row), dim=2)[None]
    grid = ((identity_grid + s * noise_grid / height) * grid_rescale).clamp(-1, 1)
    return identity_grid, noise_grid, grid


def warp(x, grid):
    """Warp float images (N,C,H,W) with a (1 or N, H, W, 2) grid (bilinear, zeros, align_corners)."""
    import torch.nn.functional as F

    if grid.shape[0] != x.shape[0]:
        grid = grid.expand(x.shape[0], -1, -1, -1)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)


class WaNet(TriggerAttack):
    name = "wanet"
    Config = WaNetConfig
    summary = "WaNet warping trigger with noise-mode covers, dirty-label, all-to-one"

    def __init__(self, config=None):
        super().__init__(config)
        self._field_seed: Optional[int] = self.config.grid_seed

    def trigger_problems(self, info):
        c = self.config
        if c.k > min(info.height, info.width):
            return [("k", f"must be <= the image size {info.height}x{info.width}, got {c.k}")]
        return []

    @property
    def field_seed(self) -> int:
        from bdframe.errors import UserError

        if self._field_seed is None:
            raise UserError("wanet: the warping field is not known yet; call poison_train first or set "
                            "grid_seed (recorded in the poisoned set's meta['grid_seed'])")
        return self._field_seed

    def field(self, height: int, width: int):
        """``(identity_grid, noise_grid, grid)`` of this attack's field."""
        c = self.config
        return warp_field(height, width, c.k, c.s, c.grid_rescale, self.field_seed)

    def poison_train(self, train, *, seed):
        import torch

        from bdframe.data import to_float, to_uint8
        from bdframe.seeding import derive_seed, generator
        from bdframe_attack_common.triggers import trigger_hash

        c = self.config
        if c.grid_seed is None:
            self._field_seed = derive_seed(seed, "wanet", "field")
        n, _, h, w = train.images.shape
        n_poison, n_cover = int(n * c.poison_rate), int(n * c.cover_rate)
        # in id order, so per-sample noise is drawn in id order
        poison_rows, cover_rows = select_rows(train, [n_poison, n_cover], generator(seed, "wanet", "select"))

        identity_grid, noise_grid, grid = self.field(h, w)
        images = train.images.clone()
        if n_poison:
            images[poison_rows] = to_uint8(warp(to_float(train.images[poison_rows]), grid))
        if n_cover:
            g = generator(seed, "wanet", "noise")
            count = 1 if c.noise == "shared" else n_cover
            ins = torch.rand(count, h, w, 2, generator=g) * 2 - 1
            grid2 = (grid + ins / h).clamp(-1, 1)
            images[cover_rows] = to_uint8(warp(to_float(train.images[cover_rows]), grid2))
        data = self.relabelled(train, images, poison_rows)
        return PoisonedSet(data=data, poison_ids=train.ids[poison_rows].clone(), cover_ids=train.ids[cover_rows].clone(),
                           meta={"grid_seed": self._field_seed, "field_sha256": trigger_hash(identity_grid, noise_grid),
                                 "target": c.target, "noise": c.noise})

    def test_trigger(self, channels: int, height: int, width: int):
        _, _, grid = self.field(height, width)
        return lambda x: warp(x, grid)


@hookimpl
def bdframe_register_attacks(registry):
    registry.add(WaNet)
