"""``standard``: cross-entropy training with SGD/Adam(W), a schedule, weight decay, label
smoothing, batched crop+flip augmentation, mixed precision on GPU and optional CutMix (see
docs/training-stages.md, standard)."""

from __future__ import annotations

import math

import attrs

from bdframe import hookimpl
from bdframe.config import in_range, optional_interval
from bdframe.interfaces import Trainer
from bdframe.training import OptimSettings


@attrs.frozen
class StandardConfig(OptimSettings):
    cutmix_prob: float = attrs.field(default=0.0, validator=in_range(0, 1), metadata={
        "help": "probability that a batch is CutMix-ed (0: off)"})
    cutmix_beta: float = attrs.field(default=1.0, validator=in_range(0, None, lo_open=True), metadata={
        "help": "CutMix: the kept share lambda is drawn from Beta(beta, beta)"})
    cutmix_clip: tuple[float, ...] = attrs.field(default=(), validator=optional_interval(0, 1), metadata={
        "help": "CutMix: [lo, hi] to clip lambda to before the box is drawn (empty: no clip)"})


def cutmix(x, generator, *, beta: float = 1.0, clip: tuple = ()):
    """CutMix of one batch (Yun et al., 2019): draw ``lambda ~ Beta(beta, beta)`` (clipped to
    ``clip`` if given), cut a box of sides ``sqrt(1 - lambda)`` times the image's at a uniformly
    drawn centre (clipped to the image), and paste it from a shuffled copy of the batch.
    Returns ``(mixed images, permutation, kept share)``, the kept share being recomputed from
    the clipped box: ``1 - box area / image area``."""
    import torch

    from bdframe.losses import beta_draw

    b, _, h, w = x.shape
    lam = beta_draw(beta, beta, generator)
    if clip:
        lam = min(max(lam, clip[0]), clip[1])
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy = int(torch.randint(0, h, (1,), generator=generator))
    cx = int(torch.randint(0, w, (1,), generator=generator))
    y1, y2 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x1, x2 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    perm = torch.randperm(b, generator=generator).to(x.device)
    mixed = x.clone()
    mixed[:, :, y1:y2, x1:x2] = x[perm, :, y1:y2, x1:x2]
    return mixed, perm, 1.0 - (y2 - y1) * (x2 - x1) / (h * w)


class Standard(Trainer):
    name = "standard"
    Config = StandardConfig
    summary = "supervised cross-entropy training (optionally with CutMix)"
    default = True  # what a recipe without this section gets

    def train(self, model, inputs, ctx):
        from bdframe.training import fit_cross_entropy, run_epochs

        c = self.config
        data = inputs.labelled
        if not c.cutmix_prob:
            return fit_cross_entropy(model, data, ctx, c)
        import torch
        import torch.nn.functional as F

        from bdframe.seeding import generator

        def loss_fn(model, b):
            x, y = b.x, b.y
            # a generator per batch, keyed by the batch's ids: resumed runs draw the same boxes
            g = generator(ctx.seed, ctx.name, "cutmix", tuple(b.ids.tolist()))
            if float(torch.rand((), generator=g)) >= c.cutmix_prob:
                logits = model(x)
                return F.cross_entropy(logits, y, label_smoothing=c.label_smoothing), logits
            mixed, perm, lam = cutmix(x, g, beta=c.cutmix_beta, clip=c.cutmix_clip)
            logits = model(mixed)
            loss = (lam * F.cross_entropy(logits, y, label_smoothing=c.label_smoothing)
                    + (1 - lam) * F.cross_entropy(logits, y[perm], label_smoothing=c.label_smoothing))
            return loss, logits

        return run_epochs(model, data, ctx, c, loss_fn)


@hookimpl
def bdframe_register_trainers(registry):
    registry.add(Standard)
