"""``relearn``: cross-entropy fine-tuning of an existing model on a (relabelled) set
(MeCa's relabel-and-relearn step; see docs/training-stages.md, relearn).

The loss is the standard stage's; what differs are the fine-tuning defaults (20 epochs at lr
0.01, SGD momentum 0.9, weight decay 5e-4, cosine schedule, crop+flip) and the intent: the
model passed to ``fit`` is already trained (MeCa's clean model) and ``data`` is the merged set
``D̂ = D̂_c ∪ relabelled D̂_p`` (Eq. 12). It has no forget set. ``class_balance = true`` weighs
every class of ``data`` the same in the loss (a set from which a defense removed part of one
class would otherwise teach the model that class is rarer).
"""

from __future__ import annotations

import attrs

from bdframe import hookimpl
from bdframe.config import in_range
from bdframe.interfaces import Trainer
from bdframe.training import OptimSettings


@attrs.frozen
class RelearnConfig(OptimSettings):
    epochs: int = attrs.field(default=20, validator=in_range(0, None))
    lr: float = attrs.field(default=0.01, validator=in_range(0, None, lo_open=True))
    class_balance: bool = attrs.field(default=False, metadata={
        "help": "weigh every class of the training set the same in the loss (each sample by n / (K * n_c), "
                "n_c its class's count, K the classes present); false: every sample the same"})


class Relearn(Trainer):
    name = "relearn"
    Config = RelearnConfig
    summary = "cross-entropy fine-tuning on a relabelled set (MeCa relabel-and-relearn)"

    def train(self, model, inputs, ctx):
        from bdframe.training import fit_cross_entropy

        return fit_cross_entropy(model, inputs.labelled, ctx, self.config, class_balance=self.config.class_balance)


@hookimpl
def bdframe_register_trainers(registry):
    registry.add(Relearn)
