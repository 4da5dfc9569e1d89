"""``blend``: Blended injection (Chen et al. 2017); see docs/attacks.md, Blend.

Dirty-label, all-to-one: a random ``int(N * poison_rate)`` training images of any class
(target class included, as in backdoor-toolbox and BackdoorBench) are blended with a
full-frame trigger, ``x' = (1 - alpha) * x + alpha * t``, and relabelled to the target. No
cover samples. Default trigger: the built-in Hello-Kitty substitute
(:mod:`bdframe_attack_common.patterns`), alpha 0.2 for training and test (toolbox,
BackdoorBench, MeCa). A user picture (``trigger_image``) replaces it; it is used without a mask
(the whole image is blended) unless ``mask_image`` is given. ``test_alpha`` sets a different test-time opacity
(BackdoorBench's separate train/test alphas). Poisoned test set: the blend on every test
image whose true label is not the target, labelled with the target.
"""

from __future__ import annotations

from typing import Optional

import attrs

from bdframe import hookimpl
from bdframe.config import in_range
from bdframe.interfaces import PoisonedSet
from bdframe_attack_common.base import MaskTriggerAttack, select_rows


@attrs.frozen
class BlendConfig:
    poison_rate: float = attrs.field(default=0.05, validator=in_range(0, 1, lo_open=True, hi_open=True),
                                     metadata={"help": "fraction of the training set poisoned"})
    target: int = attrs.field(default=1, validator=in_range(0, None), metadata={"help": "target class"})
    alpha: float = attrs.field(default=0.2, validator=in_range(0, 1, lo_open=True),
                               metadata={"help": "blend opacity of the trigger on training images"})
    test_alpha: Optional[float] = attrs.field(default=None, validator=in_range(0, 1, lo_open=True), metadata={
        "help": "blend opacity on test images (default: alpha)"})
    trigger_image: Optional[str] = attrs.field(default=None, metadata={
        "help": "trigger picture (PNG/JPEG), resized to the data; default: built-in Hello-Kitty substitute"})
    mask_image: Optional[str] = attrs.field(default=None, metadata={
        "help": "mask for trigger_image (first channel); default: blend the whole image"})

    def check(self):
        if self.mask_image and not self.trigger_image:
            return [("mask_image", "needs trigger_image")]
        return []


class Blend(MaskTriggerAttack):
    name = "blend"
    Config = BlendConfig
    summary = "Blended full-image trigger (Hello-Kitty substitute, alpha 0.2), dirty-label, all-to-one"
    full_frame = True

    def trigger_problems(self, info):
        from bdframe_attack_common.triggers import channel_problems, file_problems

        return channel_problems(info, "trigger_image") + file_problems(self.config)

    def builtin_trigger(self, channels: int, height: int, width: int):
        from bdframe_attack_common import patterns

        return patterns.get("hellokitty", channels, height, width)

    def poison_train(self, train, *, seed):
        import torch

        from bdframe.seeding import generator

        c = self.config
        (rows,) = select_rows(train, [int(len(train) * c.poison_rate)], generator(seed, "blend", "select"))
        data = self.relabelled(train, self.stamp(train.images, rows), rows)
        return PoisonedSet(data=data, poison_ids=train.ids[rows].clone(), cover_ids=torch.empty(0, dtype=torch.int64),
                           meta={"trigger_sha256": self.trigger_sha256(train.images), "target": c.target,
                                 "alpha": c.alpha, "test_alpha": self.test_alpha})

    @property
    def test_alpha(self) -> float:
        c = self.config
        return c.alpha if c.test_alpha is None else c.test_alpha


@hookimpl
def bdframe_register_attacks(registry):
    registry.add(Blend)
