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
from bdframe.interfaces import PoisonedSet
from bdframe_attack_common.base import TriggerAttack, select_rows


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


class SIG(TriggerAttack):
    name = "sig"
    Config = SIGConfig
    summary = "SIG sinusoidal signal, clean-label (target-class images only), all-to-one"

    def signal(self, channels: int, height: int, width: int):
        return signal(channels, height, width, self.config.delta, self.config.frequency)

    def add_signal(self, channels: int, height: int, width: int):
        """``x -> clip(x + v)`` on float images: the trigger, on training and test images alike."""
        v = self.signal(channels, height, width)
        return lambda x: (x + v).clamp(0, 1)

    test_trigger = add_signal

    def poison_train(self, train, *, seed):
        import torch

        from bdframe.errors import UserError
        from bdframe.seeding import generator
        from bdframe_attack_common.triggers import apply_to_rows, trigger_hash

        c = self.config
        wanted = int(len(train) * c.poison_rate)
        pool = train.labels == c.target
        available = int(pool.sum())
        if wanted > available and c.too_few == "error":
            raise UserError(f"$.attack.poison_rate: sig poisons only target-class images; int({len(train)} * "
                            f"{c.poison_rate}) = {wanted} exceeds the {available} images of class {c.target} "
                            f"(lower poison_rate or set too_few = \"cap\")")
        (rows,) = select_rows(train, [wanted], generator(seed, "sig", "select"), pool=pool)
        shape = train.images.shape[1:]
        data = train.with_images(apply_to_rows(train.images, rows, self.add_signal(*shape)))
        return PoisonedSet(data=data, poison_ids=train.ids[rows].clone(), cover_ids=torch.empty(0, dtype=torch.int64),
                           meta={"trigger_sha256": trigger_hash(self.signal(*shape)),
                                 "target": c.target, "requested_poison": wanted, "capped": len(rows) < wanted})


@hookimpl
def bdframe_register_attacks(registry):
    registry.add(SIG)
