"""``none``: no defense. Trains a fresh model on the untrusted data with the recipe's
``[train]`` stage; the baseline every defense is compared against."""

from __future__ import annotations

import attrs

from bdframe import hookimpl
from bdframe.interfaces import Defense, DefenseResult


@attrs.frozen
class NoneConfig:
    evaluate_each_epoch: bool = attrs.field(default=True, metadata={
        "help": "log clean ACC and ASR after every epoch (costs one pass over the test sets)"})


class NoDefense(Defense):
    name = "none"
    Config = NoneConfig
    summary = "plain training on the (possibly poisoned) data"
    default = True  # what a recipe without this section gets

    def run(self, data, ctx):
        model = ctx.new_model()
        ctx.component("trainer").fit(model, data, ctx.stage("train", evaluate_each_epoch=self.config.evaluate_each_epoch))
        return DefenseResult(model=model)


@hookimpl
def bdframe_register_defenses(registry):
    registry.add(NoDefense)
