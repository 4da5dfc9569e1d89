"""``badnet``: BadNets (Gu et al. 2017); see docs/attacks.md, BadNet.

Dirty-label, all-to-one: a random ``int(N * poison_rate)`` training images of any class get
the trigger and the target label; no cover samples. Default trigger: a solid white 3x3 patch
in the bottom-right corner (rows/cols 29-31 on 32x32), alpha 1 (the MeCa / BackdoorBench /
BackdoorBox setting). ``pattern = "x"`` gives the backdoor-toolbox X pattern; a user image
(``trigger_image``, optional ``mask_image``) replaces the generated patch. Poisoned test set:
the trigger on every test image whose true label is not the target.
"""

from __future__ import annotations

from typing import Optional

import attrs

from bdframe import hookimpl
from bdframe.config import in_range, one_of
from bdframe.interfaces import PoisonedSet
from bdframe_attack_common import POSITIONS
from bdframe_attack_common.base import MaskTriggerAttack


@attrs.frozen
class BadNetConfig:
    poison_rate: float = attrs.field(default=0.05, validator=in_range(0, 1, lo_open=True, hi_open=True),
                                     metadata={"help": "fraction of the training set poisoned"})
    target: int = attrs.field(default=1, validator=in_range(0, None))
    patch_size: int = attrs.field(default=3, validator=in_range(1, None))
    position: str = attrs.field(default="bottom-right", validator=one_of(*POSITIONS))
    pattern: str = attrs.field(default="white", validator=one_of("white", "x"),
                               metadata={"help": "generated patch: solid white, or the toolbox X pattern (3x3 only)"})
    alpha: float = attrs.field(default=1.0, validator=in_range(0, 1, lo_open=True))
    trigger_image: Optional[str] = attrs.field(default=None, metadata={
        "help": "full-frame trigger image (PNG/JPEG), resized to the data; replaces the generated patch"})
    mask_image: Optional[str] = attrs.field(default=None, metadata={
        "help": "mask for trigger_image (first channel; default: its non-black pixels)"})

    def check(self):
        out = []
        if self.pattern == "x" and self.patch_size != 3:
            out.append(("pattern", f"'x' is defined for patch_size = 3, got patch_size = {self.patch_size}"))
        if self.mask_image and not self.trigger_image:
            out.append(("mask_image", "needs trigger_image"))
        return out


class BadNet(MaskTriggerAttack):
    name = "badnet"
    Config = BadNetConfig
    summary = "BadNets patch trigger, dirty-label, all-to-one"

    def trigger_problems(self, info):
        from bdframe_attack_common.triggers import file_problems

        c = self.config
        out = []
        if c.trigger_image is None and c.patch_size > min(info.height, info.width):
            out.append(("patch_size", f"must be <= the image size {info.height}x{info.width}, got {c.patch_size}"))
        return out + file_problems(c)

    def builtin_trigger(self, channels: int, height: int, width: int):
        from bdframe_attack_common import patterns

        c = self.config
        if c.pattern == "x":  # backdoor-toolbox X: ones at (0,2), (1,1), (2,0), (2,2) of the 3x3 block
            return patterns.badnet_x(channels, height, width, position=c.position)
        return patterns.white_square(channels, height, width, size=c.patch_size, position=c.position)

    def poison_train(self, train, *, seed):
        import torch

        n = int(len(train) * self.config.poison_rate)
        g = torch.Generator().manual_seed(seed)
        rows = torch.randperm(len(train), generator=g)[:n]  # over row positions (see docs/attacks.md, Seeds)
        data = self.relabelled(train, self.stamp(train.images, rows), rows)
        return PoisonedSet(data=data, poison_ids=train.ids[rows].clone(), cover_ids=torch.empty(0, dtype=torch.int64),
                           meta={"trigger_sha256": self.trigger_sha256(train.images), "target": self.config.target})


@hookimpl
def bdframe_register_attacks(registry):
    registry.add(BadNet)
