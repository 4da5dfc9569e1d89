"""``standard``: cross-entropy training with SGD/Adam(W), a schedule, weight decay, label
smoothing, batched crop+flip augmentation and mixed precision on GPU (see
docs/training-stages.md, standard)."""

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
    default = True  # what a recipe without this section gets

    def fit(self, model, data, ctx, *, forget=None):
        from bdframe.training import fit_cross_entropy

        return fit_cross_entropy(model, data, ctx, self.config, forget=forget, stage="the standard")


@hookimpl
def bdframe_register_trainers(registry):
    registry.add(Standard)
