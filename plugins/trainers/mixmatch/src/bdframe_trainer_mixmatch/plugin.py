"""``mixmatch``: semi-supervised training of the whole model (MixMatch, Berthelot et al. 2019;
see docs/training-stages.md, mixmatch).

Each step takes a batch of the labelled input and one of the unlabelled input (the unlabelled
set is reshuffled whenever it is used up; an epoch is one pass over the labelled set):

1. the labelled images get the usual crop + flip; each unlabelled image gets ``k`` such views;
2. label guessing: the model's softmax averaged over an image's ``k`` views, sharpened at
   ``temperature`` (no gradient);
3. mixup: labelled and unlabelled rows (with one-hot and guessed targets) are shuffled together
   and each row is mixed with one other at ``lambda' = max(lambda, 1 - lambda)``,
   ``lambda ~ Beta(mix_alpha, mix_alpha)``, so every mix stays closer to its own row;
4. the loss: soft cross-entropy on the mixed labelled rows plus ``lambda_u`` times the mean
   squared error between predicted and mixed guessed distributions on the unlabelled rows,
   ``lambda_u`` ramped linearly from 0 over ``rampup_epochs`` (0: over every epoch).

The mixed batch goes through the model in one forward pass, so BatchNorm normalises labelled
and unlabelled rows together (what the reference's interleaving of the two achieves).

``credible_share = eps > 0`` makes the stage choose its own split: before every epoch it
computes each sample's symmetric cross-entropy under the current model (eval mode, no
augmentation) and keeps the labels of the ``floor(eps * N)`` lowest (ties by id); the others
are that epoch's unlabelled set (``split_by = "class"``: the lowest share within each given
label, so that a class the model has not learned yet is not left without labels). The stage then takes only labelled input (every sample with
its given label): DBD's semi-supervised fine-tuning. Defaults follow DBD: Adam lr 0.002, no
schedule, batches of 64, ``k = 2``, ``T = 0.5``, ``mix_alpha = 0.75``, ``lambda_u = 15``.
"""

from __future__ import annotations

import attrs

from bdframe import hookimpl
from bdframe.config import in_range, one_of
from bdframe.interfaces import Trainer
from bdframe.training import OptimSettings


@attrs.frozen
class MixMatchConfig(OptimSettings):
    epochs: int = attrs.field(default=190, validator=in_range(0, None))
    batch_size: int = attrs.field(default=64, validator=in_range(1, None))
    optimizer: str = attrs.field(default="adam", validator=one_of("sgd", "adam", "adamw"))
    lr: float = attrs.field(default=0.002, validator=in_range(0, None, lo_open=True))
    weight_decay: float = attrs.field(default=0.0, validator=in_range(0, None))
    schedule: str = attrs.field(default="constant",
                                validator=one_of("cosine", "multistep", "linear", "onecycle", "constant"))
    k: int = attrs.field(default=2, validator=in_range(1, None), metadata={
        "help": "augmented views per unlabelled image for label guessing"})
    temperature: float = attrs.field(default=0.5, validator=in_range(0, None, lo_open=True), metadata={
        "help": "sharpening temperature of the guessed labels"})
    mix_alpha: float = attrs.field(default=0.75, validator=in_range(0, None), metadata={
        "help": "mixup: lambda ~ Beta(mix_alpha, mix_alpha); 0: no mixing"})
    lambda_u: float = attrs.field(default=15.0, validator=in_range(0, None), metadata={
        "help": "weight of the unlabelled (MSE) term after its ramp-up"})
    rampup_epochs: float = attrs.field(default=0.0, validator=in_range(0, None), metadata={
        "help": "epochs over which lambda_u ramps up linearly from 0 (0: all epochs)"})
    credible_share: float = attrs.field(default=0.0, validator=in_range(0, 1), metadata={
        "help": "> 0: re-split every epoch, keeping the labels of this share with the lowest SCE loss"})
    split_by: str = attrs.field(default="all", validator=one_of("all", "class"), metadata={
        "help": "credible split: \"all\" keeps the lowest-loss share of the whole set; \"class\" the share "
                "within each given label, so every class keeps labelled samples"})
    split_alpha: float = attrs.field(default=0.1, validator=in_range(0, None), metadata={
        "help": "credible split: weight of CE in the symmetric CE"})
    split_beta: float = attrs.field(default=1.0, validator=in_range(0, None), metadata={
        "help": "credible split: weight of the reverse CE in the symmetric CE"})


def credible_split(model, data, share: float, ctx, *, alpha: float = 0.1, beta: float = 1.0,
                   split_by: str = "all"):
    """``(kept mask, per-sample SCE)``: the ``floor(share * N)`` samples of ``data`` with the
    lowest symmetric cross-entropy under ``model`` (eval mode, no augmentation) keep their
    labels (ties by id); with ``split_by = "class"`` the ``floor(share * N_c)`` lowest of each
    given label ``c``. A sample's loss does not depend on the others."""
    from bdframe.interfaces import ScoreContext
    from bdframe.losses import lowest_share
    from bdframe.scoring import sce_losses

    sctx = ScoreContext(seed=ctx.seed, device=ctx.device, batch_size=512, progress=ctx.progress)
    loss = sce_losses(model, data, sctx, alpha=alpha, beta=beta, desc=f"{ctx.name} split")
    return lowest_share(loss, share, data.ids, data.labels if split_by == "class" else None), loss


class MixMatch(Trainer):
    name = "mixmatch"
    Config = MixMatchConfig
    summary = "semi-supervised MixMatch on labelled + unlabelled data (optionally re-split by SCE each epoch)"
    inputs = ("labelled", "unlabelled")

    def train(self, model, inputs, ctx):
        """MixMatch steps; with ``credible_share`` the per-epoch split; see the module text."""
        import torch
        import torch.nn.functional as F

        from bdframe.data import Augment
        from bdframe.losses import linear_ramp, lowest_share, mixmatch_loss, mixup, mixup_weight, sharpen
        from bdframe.scoring import eval_mode
        from bdframe.training import run_epochs

        c = self.config
        labelled, unlabelled = inputs.labelled, inputs.get("unlabelled")
        split = None
        if c.credible_share > 0:
            if len(unlabelled):
                raise ValueError("the mixmatch stage with credible_share > 0 splits the data itself: "
                                 "pass every sample as labelled and no unlabelled set")
            everything = labelled
            # the size every epoch's credible set will have, counted by the split's own rule
            k = int(lowest_share(torch.zeros(len(everything)), c.credible_share, everything.ids,
                                 everything.labels if c.split_by == "class" else None).sum())
            labelled = everything.subset(torch.arange(k))  # sizes the schedule; replaced every epoch

            def resplit(model, epoch):
                keep, loss = credible_split(model, everything, c.credible_share, ctx,
                                            alpha=c.split_alpha, beta=c.split_beta, split_by=c.split_by)
                return everything.subset(keep), everything.subset(~keep), {
                    "labelled": int(keep.sum()), "unlabelled": int((~keep).sum()),
                    "split_loss_labelled": float(loss[keep].mean()) if bool(keep.any()) else 0.0,
                    "split_loss_unlabelled": float(loss[~keep].mean()) if bool((~keep).any()) else 0.0}

            split = resplit
        if len(labelled) == 0:
            return []
        weak = Augment(c.crop_padding, c.flip) if (c.crop_padding or c.flip) else (lambda x, g: x)
        steps_per_epoch = -(-len(labelled) // c.batch_size)
        ramp = c.rampup_epochs or c.epochs

        device = torch.device(ctx.device)
        model.to(device)
        with torch.no_grad(), eval_mode(model):
            n_classes = model(labelled.images[:1].to(device).float() / 255.0).shape[1]

        def loss_fn(model, b):
            g = b.generator
            x = weak(b.x, g)
            u = b.u_x if b.u_x is not None else x[:0]
            views = [weak(u, g) for _ in range(c.k)] if len(u) else []
            targets = [F.one_hot(b.y, n_classes).float()]
            if views:  # label guessing: sharpened mean prediction over the k views
                with torch.no_grad():
                    p = sum(model(v).float().softmax(1) for v in views) / c.k
                targets += [sharpen(p, c.temperature)] * c.k
            all_x, all_t = torch.cat([x] + views), torch.cat(targets)
            lam = mixup_weight(c.mix_alpha, g)
            perm = torch.randperm(len(all_x), generator=g).to(all_x.device)
            mixed_x, mixed_t = mixup(all_x, all_t, all_x[perm], all_t[perm], lam)
            logits = model(mixed_x)
            nb = len(x)
            weight = c.lambda_u * linear_ramp(b.epoch + (b.step % steps_per_epoch + 1) / steps_per_epoch, ramp)
            loss, _, _ = mixmatch_loss(logits[:nb], mixed_t[:nb], logits[nb:], mixed_t[nb:], weight)
            return loss, logits[:nb]

        return run_epochs(model, labelled, ctx, c, loss_fn, augment=None, companion=unlabelled, split=split)


@hookimpl
def bdframe_register_trainers(registry):
    registry.add(MixMatch)
