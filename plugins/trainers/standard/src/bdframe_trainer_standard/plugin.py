"""``standard``: cross-entropy training with SGD/Adam(W), a schedule, weight decay, label
smoothing, batched crop+flip augmentation and mixed precision on GPU (specs/defenses.md
section 16, "Standard")."""

from __future__ import annotations

import attrs

from bdframe import hookimpl
from bdframe.interfaces import Trainer
from bdframe.training import OptimSettings


@attrs.frozen
class StandardConfig(OptimSettings):
    pass


class Standard(Trainer):
    name = "standard"
    Config = StandardConfig
    summary = "supervised cross-entropy training"

    def fit(self, model, data, ctx, *, forget=None):
        import torch.nn.functional as F

        from bdframe.training import run_epochs

        if forget is not None and len(forget):
            raise ValueError("the standard stage has no forget set; use an unlearning or mixed stage")
        ls = self.config.label_smoothing

        def loss_fn(model, x, y, ids):
            logits = model(x)
            return F.cross_entropy(logits, y, label_smoothing=ls), logits

        return run_epochs(model, data, ctx, self.config, loss_fn)


@hookimpl
def bdframe_register_trainers(registry):
    registry.add(Standard)
