"""``adaptive-blend``: Adaptive-Blend (Qi et al., ICLR 2023); see docs/attacks.md, Adaptive-Blend.

Dirty-label, all-to-one, with covers. One random permutation of the training set (in id
order): the first ``int(N * poison_rate)`` images are poisoned (label -> target), the next
``int(N * cover_rate)`` are covers (true label kept). All classes are eligible.

Training trigger: the image is cut into a ``sqrt(pieces)`` x ``sqrt(pieces)`` grid (16 pieces:
a 4x4 grid of 8x8 blocks on 32x32; pieces are numbered row-major). For **each** poison and
cover image independently, ``round(mask_rate * pieces)`` pieces (8 of 16) are chosen
uniformly without replacement and masked out; the trigger is blended on the remaining pieces,
``x' = x + train_alpha * m * (t - x)``. Test trigger: the full, unmasked blend at ``test_alpha``.
Defaults follow MeCa: train_alpha = test_alpha = 0.2 (the paper / toolbox README uses
0.15 / 0.2), trigger = the built-in Hello-Kitty substitute (a user picture via
``trigger_image``, optional ``mask_image`` restricting it further). Per-sample masked pieces are
recorded in ``meta`` (aligned with the sorted ``poison_ids`` / ``cover_ids``). Poisoned test
set: every non-target test image, labelled with the target.
"""

from __future__ import annotations

import math
from typing import Optional

import attrs

from bdframe import hookimpl
from bdframe.config import in_range
from bdframe.interfaces import PoisonedSet
from bdframe_attack_common.base import MaskTriggerAttack, select_rows


@attrs.frozen
class AdaptiveBlendConfig:
    poison_rate: float = attrs.field(default=0.05, validator=in_range(0, 1, lo_open=True, hi_open=True),
                                     metadata={"help": "fraction of the training set poisoned"})
    cover_rate: float = attrs.field(default=0.01, validator=in_range(0, 1, hi_open=True), metadata={
        "help": "fraction of the training set given the (partial) trigger with the true label"})
    target: int = attrs.field(default=1, validator=in_range(0, None), metadata={"help": "target class"})
    pieces: int = attrs.field(default=16, validator=in_range(1, None), metadata={
        "help": "number of pieces of the trigger (a square number whose root divides the image size)"})
    mask_rate: float = attrs.field(default=0.5, validator=in_range(0, 1, hi_open=True),
                                   metadata={"help": "fraction of pieces masked out per training image"})
    train_alpha: float = attrs.field(default=0.2, validator=in_range(0, 1, lo_open=True),
                                     metadata={"help": "blend opacity on poison and cover images"})
    test_alpha: float = attrs.field(default=0.2, validator=in_range(0, 1, lo_open=True),
                                    metadata={"help": "blend opacity of the full trigger on test images"})
    trigger_image: Optional[str] = attrs.field(default=None, metadata={
        "help": "trigger picture (PNG/JPEG), resized to the data; default: built-in Hello-Kitty substitute"})
    mask_image: Optional[str] = attrs.field(default=None, metadata={
        "help": "mask for trigger_image (first channel); default: blend the whole image"})

    @property
    def grid(self) -> int:
        return math.isqrt(self.pieces)

    @property
    def masked_pieces(self) -> int:
        return int(round(self.mask_rate * self.pieces))

    def check(self):
        out = []
        if self.grid * self.grid != self.pieces:
            out.append(("pieces", f"must be a square number (4, 9, 16, ...), got {self.pieces}"))
        elif self.masked_pieces >= self.pieces:
            out.append(("mask_rate", f"round(mask_rate * pieces) = {self.masked_pieces} masks every piece; "
                                     f"must be < {self.pieces}"))
        if self.poison_rate + self.cover_rate > 1:
            out.append(("cover_rate", f"poison_rate + cover_rate must be <= 1, got "
                                      f"{self.poison_rate} + {self.cover_rate}"))
        if self.mask_image and not self.trigger_image:
            out.append(("mask_image", "needs trigger_image"))
        return out


def piece_masks(n: int, height: int, width: int, pieces: int, masked: int, g):
    """``(masks, masked_idx)``: float (n,1,H,W) masks with ``masked`` random pieces of the
    ``sqrt(pieces)`` grid set to 0 (row-major piece numbers), and the (n, masked) piece numbers."""
    import torch

    s = math.isqrt(pieces)
    masked_idx = torch.rand(n, pieces, generator=g).argsort(dim=1)[:, :masked]
    keep = torch.ones(n, pieces)
    keep.scatter_(1, masked_idx, 0.0)
    keep = keep.view(n, 1, s, s)
    masks = keep.repeat_interleave(height // s, dim=2).repeat_interleave(width // s, dim=3)
    return masks, torch.sort(masked_idx, dim=1).values


class AdaptiveBlend(MaskTriggerAttack):
    name = "adaptive-blend"
    Config = AdaptiveBlendConfig
    summary = "Adaptive-Blend: per-sample partial blend (8 of 16 pieces) with covers, all-to-one"
    full_frame = True

    def trigger_problems(self, info):
        from bdframe_attack_common.triggers import channel_problems, file_problems

        c = self.config
        out = []
        s = c.grid
        if s * s == c.pieces and (info.height % s or info.width % s):
            out.append(("pieces", f"sqrt(pieces) = {s} must divide the image size {info.height}x{info.width}"))
        out += channel_problems(info, "trigger_image")
        return out + file_problems(c)

    def builtin_trigger(self, channels: int, height: int, width: int):
        from bdframe_attack_common import patterns

        return patterns.get("hellokitty", channels, height, width)

    @property
    def test_alpha(self) -> float:
        return self.config.test_alpha

    def poison_train(self, train, *, seed):
        import torch

        from bdframe.data import to_float, to_uint8
        from bdframe.errors import UserError
        from bdframe.seeding import generator
        from bdframe_attack_common.triggers import mask_blend, trigger_hash

        c = self.config
        n, ch, h, w = train.images.shape
        if h % c.grid or w % c.grid:
            raise UserError(f"$.attack.pieces: sqrt(pieces) = {c.grid} must divide the image size {h}x{w}")
        n_poison, n_cover = int(n * c.poison_rate), int(n * c.cover_rate)
        p_rows, c_rows = select_rows(train, [n_poison, n_cover], generator(seed, "adaptive-blend", "select"))
        rows = torch.cat([p_rows, c_rows])  # poisons then covers, each in id order
        pattern, mask = self.trigger(ch, h, w)
        masks, masked_idx = piece_masks(len(rows), h, w, c.pieces, c.masked_pieces,
                                        generator(seed, "adaptive-blend", "pieces"))
        images = train.images.clone()
        if len(rows):
            images[rows] = to_uint8(mask_blend(to_float(train.images[rows]), pattern, mask * masks, c.train_alpha))
        data = self.relabelled(train, images, p_rows)
        return PoisonedSet(data=data, poison_ids=train.ids[p_rows].clone(), cover_ids=train.ids[c_rows].clone(),
                           meta={"trigger_sha256": trigger_hash(pattern, mask), "target": c.target,
                                 "pieces": c.pieces, "masked_pieces": c.masked_pieces,
                                 "train_alpha": c.train_alpha, "test_alpha": c.test_alpha,
                                 "poison_masked": masked_idx[:n_poison].tolist(),
                                 "cover_masked": masked_idx[n_poison:].tolist()})


@hookimpl
def bdframe_register_attacks(registry):
    registry.add(AdaptiveBlend)
