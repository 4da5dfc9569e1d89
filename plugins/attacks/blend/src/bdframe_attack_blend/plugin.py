"""``blend``: Blended injection (Chen et al. 2017); see docs/attacks.md, Blend.

Dirty-label, all-to-one: a random ``int(N * poison_rate)`` training images of any class
(target class included, as in backdoor-toolbox and BackdoorBench) are blended with a
full-frame trigger, ``x' = (1 - alpha) * x + alpha * t``, and relabelled to the target. No
cover samples. Default trigger: the built-in Hello-Kitty substitute
(:mod:`bdframe.patterns`), alpha 0.2 for training and test (toolbox, BackdoorBench, MeCa).
A user picture (``trigger_image``) replaces it; it is used without a mask (the whole image is
blended) unless ``mask_image`` is given. ``test_alpha`` sets a different test-time opacity
(BackdoorBench's separate train/test alphas). Poisoned test set: the blend on every test
image whose true label is not the target, labelled with the target.
"""

from __future__ import annotations

from typing import Optional

import attrs

from bdframe import hookimpl
from bdframe.config import in_range
from bdframe.interfaces import Attack, PoisonedSet


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


class Blend(Attack):
    name = "blend"
    Config = BlendConfig
    summary = "Blended full-image trigger (Hello-Kitty substitute, alpha 0.2), dirty-label, all-to-one"

    def check_dataset(self, info):
        from bdframe.triggers import channel_problems, class_problems, file_problems

        c = self.config
        out = class_problems(c, info.num_classes)
        out += channel_problems(info, "trigger_image")
        return out + file_problems(c)

    def trigger(self, channels: int, height: int, width: int):
        """``(pattern, mask)``, float (C,H,W) and (1,H,W)."""
        import torch

        from bdframe import patterns
        from bdframe.triggers import read_image

        c = self.config
        if not c.trigger_image:
            return patterns.get("hellokitty", channels, height, width)
        pattern = read_image(c.trigger_image, "$.attack.trigger_image", height, width, channels)
        if c.mask_image:
            mask = read_image(c.mask_image, "$.attack.mask_image", height, width, channels)[:1]
        else:
            mask = torch.ones(1, height, width)
        return pattern, mask

    def _apply(self, images, rows, alpha):
        from bdframe.triggers import apply_to_rows, mask_blend

        pattern, mask = self.trigger(*images.shape[1:])
        return apply_to_rows(images, rows, lambda x: mask_blend(x, pattern, mask, alpha))

    def poison_train(self, train, *, seed):
        import torch

        from bdframe.seeding import generator
        from bdframe.triggers import trigger_hash

        c = self.config
        n = int(len(train) * c.poison_rate)
        order = torch.argsort(train.ids)  # selection depends on the ids, not on the row order
        rows = order[torch.randperm(len(train), generator=generator(seed, "blend", "select"))[:n]]
        labels = train.labels.clone()
        labels[rows] = c.target
        data = train.with_images(self._apply(train.images, rows, c.alpha)).with_labels(labels)
        pattern, mask = self.trigger(*train.images.shape[1:])
        return PoisonedSet(data=data, poison_ids=torch.sort(train.ids[rows]).values,
                           cover_ids=torch.empty(0, dtype=torch.int64),
                           meta={"trigger_sha256": trigger_hash(pattern, mask), "target": c.target,
                                 "alpha": c.alpha, "test_alpha": self.test_alpha})

    @property
    def test_alpha(self) -> float:
        c = self.config
        return c.alpha if c.test_alpha is None else c.test_alpha

    def poison_test(self, test):
        import torch

        c = self.config
        sub = test.subset(test.labels != c.target)
        return sub.with_images(self._apply(sub.images, torch.arange(len(sub)), self.test_alpha)).with_labels(
            torch.full((len(sub),), c.target, dtype=torch.int64))


@hookimpl
def bdframe_register_attacks(registry):
    registry.add(Blend)
