"""``unlearning``: gradient ascent on a forget set (see docs/training-stages.md, unlearning;
used by ABL, D-BR and SCAnFT).

Objectives on a batch of the forget set, with ``l`` its cross-entropy:

- ``ascent`` (default): ``-l``, an SGD step on the negative mean CE;
- ``flooding``: ``|l - b| + b`` (ascent while the loss is below ``flood_level`` b, descent above);
- ``lga``: ``sign(l - gamma) * l`` (ABL's local gradient ascent around ``lga_gamma``).

``l`` is the batch-mean CE (``per_sample = false``, what every reference implementation does)
or each sample's CE, with the bound applied per sample before averaging (``per_sample = true``).

``fit(model, data, ctx, forget=forget)`` unlearns ``forget`` when it is given and ``data``
otherwise; passing both non-empty is an error (the mixed stage learns one set while unlearning
another). Defaults follow the SCAnFT/ABL unlearning settings: 5 epochs at a constant lr 5e-4.
"""

from __future__ import annotations

import attrs

from bdframe import hookimpl
from bdframe.config import in_range, one_of
from bdframe.interfaces import Trainer
from bdframe.training import OptimSettings


@attrs.frozen
class UnlearningConfig(OptimSettings):
    epochs: int = attrs.field(default=5, validator=in_range(0, None))
    lr: float = attrs.field(default=5e-4, validator=in_range(0, None, lo_open=True))
    schedule: str = attrs.field(default="constant",
                                validator=one_of("cosine", "multistep", "linear", "onecycle", "constant"))
    objective: str = attrs.field(default="ascent", validator=one_of("ascent", "flooding", "lga"),
                                 metadata={"help": "ascent: -CE; flooding: |CE-b|+b; lga: sign(CE-gamma)*CE"})
    flood_level: float = attrs.field(default=0.5, validator=in_range(0, None),
                                     metadata={"help": "flooding level b"})
    lga_gamma: float = attrs.field(default=0.5, validator=in_range(0, None),
                                   metadata={"help": "LGA threshold gamma"})
    per_sample: bool = attrs.field(default=False, metadata={
        "help": "apply the flooding/LGA bound per sample instead of to the batch-mean loss"})


def unlearning_loss(logits, y, objective: str = "ascent", *, flood_level: float = 0.5, lga_gamma: float = 0.5,
                    per_sample: bool = False):
    """The unlearning objective on one batch (to be minimised)."""
    import torch
    import torch.nn.functional as F

    ce = F.cross_entropy(logits.float(), y, reduction="none")
    if objective == "ascent":
        return -ce.mean()
    loss = ce if per_sample else ce.mean()
    if objective == "flooding":
        out = (loss - flood_level).abs() + flood_level
    else:  # lga
        out = torch.sign(loss - lga_gamma).detach() * loss
    return out.mean()


class Unlearning(Trainer):
    name = "unlearning"
    Config = UnlearningConfig
    summary = "gradient ascent on a forget set (optional flooding or LGA bound)"
    inputs = ("labelled", "forget")

    def train(self, model, inputs, ctx):
        from bdframe.training import run_epochs

        c = self.config
        if len(inputs.given()) > 1:
            raise ValueError("the unlearning stage unlearns one set: pass it as `forget` (with an empty `data`) "
                             "or as `data`; use the mixed stage to learn one set while unlearning another")
        target = inputs.get("forget") if "forget" in inputs.given() else inputs.labelled

        def loss_fn(model, b):
            logits = model(b.x)
            return unlearning_loss(logits, b.y, c.objective, flood_level=c.flood_level, lga_gamma=c.lga_gamma,
                                   per_sample=c.per_sample), logits

        return run_epochs(model, target, ctx, c, loss_fn)


@hookimpl
def bdframe_register_trainers(registry):
    registry.add(Unlearning)
