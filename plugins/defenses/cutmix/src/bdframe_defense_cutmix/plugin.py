"""``cutmix``: CutMix as a defense (Borgnia et al., ICASSP 2021).

Pasting a box from another image of the batch over each image, with the labels mixed in
proportion to the areas, breaks up small local triggers; large or global triggers survive it.

- ``mode = "scratch"``: a fresh model trained with the recipe's ``[train]`` stage with CutMix
  on every batch (``prob``).
- ``mode = "repair"``: the model plain training gives (exactly the model the ``none`` defense
  trains with the recipe, no CutMix: the backdoored model; or ``model = "runs/x/model.pt"``),
  then ``repair_epochs`` more epochs of the same stage at ``repair_lr`` with CutMix, as the MeCa
  paper's tables use it.

The ``[train]`` stage must have CutMix options (the ``standard`` stage). The defense flags no
samples. Each step is a checkpoint for ``--resume``.
"""

from __future__ import annotations

import attrs

from bdframe import hookimpl, steps
from bdframe.config import in_range, one_of, optional_interval, starting_model_field
from bdframe.errors import UserError
from bdframe.interfaces import Defense, DefenseResult


@attrs.frozen
class CutMixConfig:
    mode: str = attrs.field(default="scratch", validator=one_of("scratch", "repair"), metadata={
        "help": "scratch: train a fresh model with CutMix; repair: plain training, then CutMix fine-tuning"})
    prob: float = attrs.field(default=1.0, validator=in_range(0, 1), metadata={
        "help": "probability that a batch is CutMix-ed"})
    beta: float = attrs.field(default=1.0, validator=in_range(0, None, lo_open=True), metadata={
        "help": "the kept share lambda ~ Beta(beta, beta)"})
    clip: tuple[float, ...] = attrs.field(default=(), validator=optional_interval(0, 1), metadata={
        "help": "[lo, hi] to clip lambda to (one implementation uses [0.3, 0.7]); empty: no clip"})
    model: str = starting_model_field("repair", when="repair mode")
    repair_epochs: int = attrs.field(default=20, validator=in_range(0, None), metadata={
        "help": "repair mode: epochs of CutMix fine-tuning"})
    repair_lr: float = attrs.field(default=0.01, validator=in_range(0, None, lo_open=True), metadata={
        "help": "repair mode: peak learning rate of the CutMix fine-tuning"})
    evaluate_each_epoch: bool = attrs.field(default=True, metadata={
        "help": "log clean ACC and ASR after every epoch (costs one pass over the test sets)"})

    def check(self):
        if self.model and self.mode != "repair":
            return [("model", "a model to repair is only used with mode = \"repair\"")]
        return []


class CutMix(Defense):
    name = "cutmix"
    Config = CutMixConfig
    summary = "CutMix training, from scratch or as a repair phase after plain training"

    def run(self, data, ctx):
        c = self.config
        mix = {"cutmix_prob": c.prob, "cutmix_beta": c.beta, "cutmix_clip": c.clip}
        try:
            mixed = (ctx.component("trainer", **mix) if c.mode == "scratch" else
                     ctx.component("trainer", epochs=c.repair_epochs, lr=c.repair_lr, **mix))
        except (TypeError, ValueError, UserError) as e:
            raise UserError(f"$.defense: cutmix needs a [train] stage with CutMix options (name = \"standard\"): "
                            f"{str(e).splitlines()[0]}") from None
        plain = c.mode == "repair"
        trend, seconds = [], {}
        if plain:  # the model the none defense trains with this recipe
            model, done = steps.starting_model(ctx, "cutmix-plain", data, path=c.model,
                                               evaluate_each_epoch=c.evaluate_each_epoch)
            trend.append({"step": "plain", **done["eval"]})
            seconds["plain"] = done["seconds"]
        else:
            model = ctx.new_model()

        def step(name, trainer, setting):
            done = steps.train(ctx, name, model, trainer, data, lr_setting=setting,
                               evaluate_each_epoch=c.evaluate_each_epoch)
            trend.append({"step": name.removeprefix("cutmix-"), **done["eval"]})
            seconds[name.removeprefix("cutmix-")] = done["seconds"]

        step("cutmix-repair" if plain else "cutmix-train", mixed, "[defense] repair_lr" if plain else "[train] lr")

        summary = ([steps.start_line("cutmix", c.model, trend[0]),
                    f"cutmix: after {c.repair_epochs} epochs of CutMix repair: {steps.figures(trend[1])}"]
                   if plain else [f"cutmix: trained from scratch with CutMix: {steps.figures(trend[0])}"])
        return DefenseResult(model=model, metrics={"trend": trend, "stage_seconds": seconds}, summary=summary)


@hookimpl
def bdframe_register_defenses(registry):
    registry.add(CutMix)
