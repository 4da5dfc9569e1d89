"""``sig``: sinusoidal signal backdoor (Barni et al. 2019); see docs/attacks.md, SIG.

Clean-label, all-to-one. Poison candidates are only the **target-class** training images;
``num_poison = min(int(N * poison_rate), #target images)`` of them (N = the whole training
set, as in backdoor-toolbox and BackdoorBench) get the signal, their labels stay as they are
and nothing else is modified. ``too_few = "error"`` raises instead of capping.

Trigger: a horizontal sinusoid, the same on every row and channel,
``v[i, j] = delta * sin(2 * pi * j * frequency / W)`` with ``j`` the column; ``x' = clip(x + v)``.
Defaults: delta = 30/255, frequency 6 (backdoor-toolbox; BackdoorBench uses delta 40/255).
Poisoned test set: the same signal on every non-target test image, labelled with the target.
"""

from __future__ import annotations

import attrs

from bdframe import hookimpl
from bdframe.config import in_range, one_of
from bdframe.interfaces import Attack, PoisonedSet


@attrs.frozen
class SIGConfig:
    poison_rate: float = attrs.field(default=0.05, validator=in_range(0, 1, lo_open=True, hi_open=True), metadata={
        "help": "poisoned images as a fraction of the whole training set, drawn from the target class"})
    target: int = attrs.field(default=1, validator=in_range(0, None), metadata={"help": "target class"})
    delta: float = attrs.field(default=30 / 255, validator=in_range(0, 1, lo_open=True),
                               metadata={"help": "signal amplitude on the [0,1] pixel scale"})
    frequency: float = attrs.field(default=6.0, validator=in_range(0, None, lo_open=True),
                                   metadata={"help": "number of periods across the image width"})
    too_few: str = attrs.field(default="cap", validator=one_of("cap", "error"), metadata={
        "help": "when the target class has fewer than int(N * poison_rate) images: "
                "'cap' (poison all of them) or 'error'"})


def signal(channels: int, height: int, width: int, delta: float, frequency: float):
    """The additive SIG signal, float (C,H,W)."""
    import math

    import torch

    j = torch.arange(width, dtype=torch.float64)
    row = delta * torch.sin(2 * math.pi * j * frequency / width)
    return row.float().view(1, 1, width).expand(channels, height, width).contiguous()


class SIG(Attack):
    name = "sig"
    Config = SIGConfig
    summary = "SIG sinusoidal signal, clean-label (target-class images only), all-to-one"

    def check_dataset(self, info):
        from bdframe.triggers import class_problems

        return class_problems(self.config, info.num_classes)

    def signal(self, channels: int, height: int, width: int):
        return signal(channels, height, width, self.config.delta, self.config.frequency)

    def _apply(self, images, rows):
        from bdframe.triggers import apply_to_rows

        v = self.signal(*images.shape[1:])
        return apply_to_rows(images, rows, lambda x: (x + v).clamp(0, 1))

    def poison_train(self, train, *, seed):
        import torch

        from bdframe.errors import UserError
        from bdframe.seeding import generator
        from bdframe.triggers import trigger_hash

        c = self.config
        wanted = int(len(train) * c.poison_rate)
        cand = torch.nonzero(train.labels == c.target).flatten()
        cand = cand[torch.argsort(train.ids[cand])]  # id order: independent of the row order
        if wanted > len(cand) and c.too_few == "error":
            raise UserError(f"$.attack.poison_rate: sig poisons only target-class images; int({len(train)} * "
                            f"{c.poison_rate}) = {wanted} exceeds the {len(cand)} images of class {c.target} "
                            f"(lower poison_rate or set too_few = \"cap\")")
        n = min(wanted, len(cand))
        rows = cand[torch.randperm(len(cand), generator=generator(seed, "sig", "select"))[:n]]
        data = train.with_images(self._apply(train.images, rows))
        return PoisonedSet(data=data, poison_ids=torch.sort(train.ids[rows]).values,
                           cover_ids=torch.empty(0, dtype=torch.int64),
                           meta={"trigger_sha256": trigger_hash(self.signal(*train.images.shape[1:])),
                                 "target": c.target, "requested_poison": wanted, "capped": n < wanted})

    def poison_test(self, test):
        import torch

        c = self.config
        sub = test.subset(test.labels != c.target)
        return sub.with_images(self._apply(sub.images, torch.arange(len(sub)))).with_labels(
            torch.full((len(sub),), c.target, dtype=torch.int64))


@hookimpl
def bdframe_register_attacks(registry):
    registry.add(SIG)
