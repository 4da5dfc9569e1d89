"""``linear-probe``: train the classifier head on a frozen backbone (see
docs/training-stages.md, linear-probe).

The backbone's features are computed without gradient and in eval mode, so its weights *and*
its BatchNorm statistics stay bit-identical; only the parameters the head uses (found by
:func:`bdframe.nn.head_parameter_names`) train. (DBD's reference computes the features in train
mode, so its BatchNorm statistics drift during this stage although no weight changes; keeping
them fixed means the head is trained on exactly the features it is evaluated on.)

Objective on a batch, with ``forget`` rows weighted by ``lam``:

    mean over labelled rows of L  -  lam * mean over forget rows of CE

where ``L`` is cross-entropy (``loss = "ce"``) or symmetric cross-entropy
``alpha * CE + beta * RCE`` (``loss = "sce"``, DBD's linear stage: alpha 0.1, beta 1.0). A term
is 0 when the batch holds none of its rows. DBR's secure training uses ``loss = "ce"`` with a
forget set and ``lam = 0.001``. Defaults follow DBD: 10 epochs, Adam lr 0.002, batch 128,
crop + flip, ``reset_head`` re-initialises the head first.
"""

from __future__ import annotations

import attrs

from bdframe import hookimpl
from bdframe.config import in_range, one_of
from bdframe.interfaces import Trainer
from bdframe.training import OptimSettings


@attrs.frozen
class LinearProbeConfig(OptimSettings):
    epochs: int = attrs.field(default=10, validator=in_range(0, None))
    optimizer: str = attrs.field(default="adam", validator=one_of("sgd", "adam", "adamw"))
    lr: float = attrs.field(default=0.002, validator=in_range(0, None, lo_open=True))
    weight_decay: float = attrs.field(default=0.0, validator=in_range(0, None))
    schedule: str = attrs.field(default="constant",
                                validator=one_of("cosine", "multistep", "linear", "onecycle", "constant"))
    loss: str = attrs.field(default="sce", validator=one_of("ce", "sce"), metadata={
        "help": "ce: cross-entropy; sce: alpha * CE + beta * reverse CE"})
    alpha: float = attrs.field(default=0.1, validator=in_range(0, None), metadata={"help": "sce: weight of CE"})
    beta: float = attrs.field(default=1.0, validator=in_range(0, None), metadata={
        "help": "sce: weight of the reverse CE"})
    lam: float = attrs.field(default=0.001, validator=in_range(0, None), metadata={
        "help": "weight of the forget rows' CE, subtracted (only with a forget set)"})
    reset_head: bool = attrs.field(default=True, metadata={
        "help": "re-initialise the head's parameters before training it"})


def reset_parameters(model, names) -> None:
    """Re-initialise the modules that own the parameters ``names`` (those with a
    ``reset_parameters`` method; torch's default initialisation)."""
    owners = {n.rsplit(".", 1)[0] for n in names}
    for mname, module in model.named_modules():
        if mname in owners and callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()


class LinearProbe(Trainer):
    name = "linear-probe"
    Config = LinearProbeConfig
    summary = "train the head on a frozen backbone (CE or symmetric CE; optional forget term)"
    inputs = ("labelled", "forget")

    def train(self, model, inputs, ctx):
        """Freeze the backbone, train the head; see the module text."""
        import torch
        import torch.nn.functional as F

        from bdframe.losses import symmetric_cross_entropy
        from bdframe.nn import head_parameter_names
        from bdframe.scoring import eval_mode
        from bdframe.training import run_epochs

        c = self.config
        forget = inputs.get("forget")
        data = inputs.union("labelled", "forget")
        if len(data) == 0 or c.epochs == 0:
            return []
        device = torch.device(ctx.device)
        model.to(device)
        with torch.no_grad(), eval_mode(model):
            f = model.features(data.images[:2].to(device).float() / 255.0)
        head = set(head_parameter_names(model, f))
        if c.reset_head:
            reset_parameters(model, head)
        forget_ids = forget.ids.clone()
        was = {n: p.requires_grad for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.requires_grad_(n in head)

        def loss_fn(model, b):
            with torch.no_grad(), eval_mode(model):
                feats = model.features(b.x)
            logits = model.head(feats).float()
            fmask = torch.isin(b.ids, forget_ids).to(logits.device)
            lmask = ~fmask
            if c.loss == "sce":
                per = symmetric_cross_entropy(logits, b.y, alpha=c.alpha, beta=c.beta, reduction="none")
            else:
                per = F.cross_entropy(logits, b.y, reduction="none")
            loss = (per * lmask).sum() / lmask.sum().clamp(min=1)
            if c.lam and bool(fmask.any()):
                ce = F.cross_entropy(logits, b.y, reduction="none")
                loss = loss - c.lam * (ce * fmask).sum() / fmask.sum()
            return loss, logits

        try:
            return run_epochs(model, data, ctx, c, loss_fn)
        finally:
            for n, p in model.named_parameters():
                p.requires_grad_(was[n])


@hookimpl
def bdframe_register_trainers(registry):
    registry.add(LinearProbe)
