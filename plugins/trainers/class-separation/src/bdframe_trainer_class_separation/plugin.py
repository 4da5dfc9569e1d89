"""``class-separation``: push the class centres of the features apart (DBR's intra-class loss;
see docs/training-stages.md, class-separation).

On each batch: the L2-normalised mean penultimate feature of every class present, and the loss
is the mean of their pairwise cosine similarities (diagonal set to 0; see
:func:`bdframe.losses.class_centre_similarity`). DBR fine-tunes its scoring model this way
after two epochs of plain training, so that poisoned samples, whose features sit between their
source class and the target class, move away from the genuine target-class samples and react
more to a transformation. Defaults follow the reference: 10 epochs, SGD lr 0.01, momentum 0.9,
weight decay 5e-4, batch 128, no augmentation.
"""

from __future__ import annotations

import attrs

from bdframe import hookimpl
from bdframe.config import in_range, one_of
from bdframe.interfaces import Trainer
from bdframe.training import OptimSettings


@attrs.frozen
class ClassSeparationConfig(OptimSettings):
    epochs: int = attrs.field(default=10, validator=in_range(0, None))
    lr: float = attrs.field(default=0.01, validator=in_range(0, None, lo_open=True))
    schedule: str = attrs.field(default="constant",
                                validator=one_of("cosine", "multistep", "linear", "onecycle", "constant"))
    crop_padding: int = attrs.field(default=0, validator=in_range(0, None))
    flip: bool = False


class ClassSeparation(Trainer):
    name = "class-separation"
    Config = ClassSeparationConfig
    summary = "push the batch's class centres apart in feature space (DBR's intra-class loss)"

    def train(self, model, inputs, ctx):
        """The intra-class loss on every batch of the labelled input."""
        from bdframe.losses import class_centre_similarity
        from bdframe.training import run_epochs

        def loss_fn(model, b):
            f = model.features(b.x)
            return class_centre_similarity(f, b.y), model.head(f)

        return run_epochs(model, inputs.labelled, ctx, self.config, loss_fn)


@hookimpl
def bdframe_register_trainers(registry):
    registry.add(ClassSeparation)
