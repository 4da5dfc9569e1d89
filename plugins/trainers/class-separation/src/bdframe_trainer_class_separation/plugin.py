"""``class-separation``: push the class centres of the features apart (DBR's intra-class loss;
see docs/training-stages.md, class-separation).

On each batch: the L2-normalised mean penultimate feature of every class present, and the loss
is the mean of their pairwise cosine similarities (diagonal set to 0; see
:func:`bdframe.losses.class_centre_similarity`). DBR fine-tunes its scoring model this way
after two epochs of plain training, so that poisoned samples, whose features sit between their
source class and the target class, move away from the genuine target-class samples and react
more to a transformation. Defaults follow the reference: 10 epochs, SGD lr 0.01, momentum 0.9,
weight decay 5e-4, batch 128, no augmentation.

Every epoch's history record also holds ``loss_floor``, the lowest mean loss the epoch's batches
could reach: -1/k on a batch of k classes (k unit vectors spread as far apart as they can be),
0 on a batch whose features are all non-negative (as after a ReLU: such centres can at best be
orthogonal). ``stop_gap`` ends the stage once the epoch's mean loss is within that distance of
the floor: the objective can hardly fall further, and more epochs then change the features
without separating the classes more (an addition to the reference, off by default).
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
    stop_gap: float = attrs.field(default=0.0, validator=in_range(0, None), metadata={
        "help": "stop once an epoch's mean loss is within this distance of its floor (-1/k on a batch of k "
                "classes; 0 for non-negative features), before epochs; 0: run every epoch"})


class ClassSeparation(Trainer):
    name = "class-separation"
    Config = ClassSeparationConfig
    summary = "push the batch's class centres apart in feature space (DBR's intra-class loss)"

    def train(self, model, inputs, ctx):
        """The intra-class loss on every batch of the labelled input."""
        from bdframe.losses import class_centre_similarity
        from bdframe.training import run_epochs

        floor = {"sum": 0.0, "n": 0}  # this epoch's floor, weighted by batch size like its loss

        def loss_fn(model, b):
            f = model.features(b.x)
            floor["sum"] += batch_floor(f, b.y) * len(b.y)
            floor["n"] += len(b.y)
            return class_centre_similarity(f, b.y), model.head(f)

        def stop(rec: dict) -> bool:
            rec["loss_floor"] = floor["sum"] / max(floor["n"], 1)
            floor.update(sum=0.0, n=0)
            gap = self.config.stop_gap
            return gap > 0 and rec["loss"] - rec["loss_floor"] <= gap

        return run_epochs(model, inputs.labelled, ctx, self.config, loss_fn, stop=stop)


def batch_floor(features, labels) -> float:
    """The lowest value :func:`bdframe.losses.class_centre_similarity` can take on a batch with
    these labels and features of this sign: -1/k for k classes present (the sum of the pairwise
    cosines of k unit vectors is at least -k, reached by a regular simplex), 0 for one class or
    when every feature is non-negative (cosines of non-negative vectors are >= 0)."""
    import torch

    k = int(torch.unique(labels).numel())
    if k < 2 or bool((features.detach() >= 0).all()):
        return 0.0
    return -1.0 / k


@hookimpl
def bdframe_register_trainers(registry):
    registry.add(ClassSeparation)
