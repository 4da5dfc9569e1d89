"""``simclr``: contrastive pre-training of the backbone (see docs/training-stages.md, simclr).

Each step draws two random views of every image of the batch (random resized crop, flip, colour
jitter, grayscale, Gaussian blur; batched, see :class:`bdframe.augment.ContrastiveViews`), passes
both through the model's backbone and a projection head (``d -> d -> BatchNorm -> ReLU ->
projection_dim``) added for this stage, and minimises the contrastive loss of the L2-normalised
projections at ``temperature``. Which pairs are positive is the ``mode``:

- ``simclr`` (SimCLR's NT-Xent): an anchor's only positive is its own other view; labels are
  ignored, so the labelled and unlabelled inputs are used alike;
- ``supcon`` (supervised contrastive): every view of a same-label sample is a positive; every
  input must be labelled;
- ``ss-ctl`` (DBR's secure training): labelled anchors (the credible samples) take same-label
  positives, unlabelled anchors only their own other view. ``clean_positives_only`` (default)
  restricts a labelled anchor's same-label positives to labelled samples.

Only the backbone (``model.features``) and the projection head train; the classifier head is
untouched and the projection head is dropped when the stage ends (it is kept in the stage's
resumable state while it runs). Defaults follow DBD's self-supervised stage: SGD lr 0.4,
momentum 0.9, weight decay 1e-4, cosine, batch 512, temperature 0.5.
"""

from __future__ import annotations

import attrs

from bdframe import hookimpl
from bdframe.config import in_range, interval, one_of
from bdframe.interfaces import Trainer
from bdframe.training import OptimSettings


@attrs.frozen
class SimCLRConfig(OptimSettings):
    epochs: int = attrs.field(default=100, validator=in_range(0, None))
    batch_size: int = attrs.field(default=512, validator=in_range(2, None))
    lr: float = attrs.field(default=0.4, validator=in_range(0, None, lo_open=True))
    weight_decay: float = attrs.field(default=1e-4, validator=in_range(0, None))
    crop_padding: int = attrs.field(default=0, validator=in_range(0, 0), metadata={
        "help": "unused: the stage draws its own views (crop_scale, jitter, ...)"})
    flip: bool = attrs.field(default=True, metadata={"help": "random horizontal flip of each view"})
    mode: str = attrs.field(default="simclr", validator=one_of("simclr", "supcon", "ss-ctl"), metadata={
        "help": "positives: simclr (own other view), supcon (same label), ss-ctl (same label for labelled anchors)"})
    temperature: float = attrs.field(default=0.5, validator=in_range(0, None, lo_open=True), metadata={
        "help": "softmax temperature of the contrastive loss"})
    clean_positives_only: bool = attrs.field(default=True, metadata={
        "help": "ss-ctl: a labelled anchor's same-label positives are labelled samples only"})
    projection_dim: int = attrs.field(default=128, validator=in_range(1, None), metadata={
        "help": "output size of the projection head"})
    crop_scale: tuple[float, ...] = attrs.field(default=(0.2, 1.0), validator=interval(0.01, 1.0), metadata={
        "help": "random resized crop: [low, high] share of the image area"})
    jitter_p: float = attrs.field(default=0.8, validator=in_range(0, 1), metadata={
        "help": "probability of colour jitter (brightness/contrast/saturation 0.4, hue 0.1)"})
    jitter_strength: float = attrs.field(default=0.4, validator=in_range(0, 1), metadata={
        "help": "brightness, contrast and saturation factors in [1 - s, 1 + s]"})
    gray_p: float = attrs.field(default=0.2, validator=in_range(0, 1), metadata={"help": "probability of grayscale"})
    blur_p: float = attrs.field(default=0.5, validator=in_range(0, 1), metadata={
        "help": "probability of a Gaussian blur, sigma in [0.1, 2]"})


def projection_head(dim: int, out: int):
    """The projection MLP of SimCLR as DBD uses it: ``Linear(d, d) -> BatchNorm -> ReLU ->
    Linear(d, out)``."""
    from torch import nn

    return nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True), nn.Linear(dim, out))


class SimCLR(Trainer):
    name = "simclr"
    Config = SimCLRConfig
    summary = "contrastive pre-training of the backbone (SimCLR, SupCon or SS-CTL positives)"
    inputs = ("labelled", "unlabelled")

    def views(self):
        from bdframe.augment import ContrastiveViews

        c = self.config
        s = c.jitter_strength
        return ContrastiveViews(scale=tuple(c.crop_scale), flip=c.flip, jitter_p=c.jitter_p, brightness=s,
                                contrast=s, saturation=s, gray_p=c.gray_p, blur_p=c.blur_p)

    def train(self, model, inputs, ctx):
        """Contrastive training of the backbone on every input; see the module text."""
        import torch

        from bdframe.losses import info_nce, positive_mask
        from bdframe.scoring import eval_mode
        from bdframe.training import run_epochs

        c = self.config
        labelled, unlabelled = inputs.labelled, inputs.get("unlabelled")
        if c.mode == "supcon" and len(unlabelled):
            raise ValueError("the simclr stage in mode 'supcon' needs every sample labelled; "
                             "use mode 'ss-ctl' to give unlabelled samples their own view as only positive")
        data = inputs.union("labelled", "unlabelled")
        if len(data) < 2:
            return []
        device = torch.device(ctx.device)
        model.to(device)
        with torch.no_grad(), eval_mode(model):
            dim = model.features(data.images[:2].to(device).float() / 255.0).shape[1]
        proj = projection_head(dim, c.projection_dim)
        labelled_ids = labelled.ids.clone()
        views = self.views()
        mode = c.mode

        def loss_fn(model, b):
            g = b.generator
            x = torch.cat([views(b.x, g), views(b.x, g)])
            z = proj(model.features(x))
            clean = torch.isin(b.ids, labelled_ids) if mode == "ss-ctl" else None
            mask = positive_mask(b.y, mode=mode, clean=clean, clean_positives_only=c.clean_positives_only)
            return info_nce(z, mask.to(z.device), temperature=c.temperature), None

        return run_epochs(model, data, ctx, c, loss_fn, augment=None, modules={"projection": proj})


@hookimpl
def bdframe_register_trainers(registry):
    registry.add(SimCLR)
