"""``d-br`` and ``d-st``: DBR, "Effective Backdoor Defense by Exploiting Sensitivity of Poisoned
Samples" (Chen, Wu & Wang, NeurIPS 2022).

Poisoned samples react more than clean ones to a transformation of the image: their features
move further (feature consistency towards transformations, FCT). Both defenses start with the
**FCT split** (:func:`fct_split`):

1. a scoring model is trained from scratch on the untrusted data *without augmentation* for
   ``notrans_epochs`` (2) at ``scoring_lr`` (0.01), then fine-tuned with the
   ``class-separation`` stage for ``intra_epochs`` (10), which pushes the class centres apart
   (``intra_stop_gap`` ends it once its loss is that close to the lowest it can be);
2. every sample gets its FCT score (the ``fct`` scorer: rotation then translation);
3. the ``alpha_clean`` (20%) lowest scores are the suspected-clean set, the ``alpha_poison`` (5%)
   highest the suspected-poisoned set, the rest uncertain. The three partition the data.

``d-br`` (backdoor removal) then repairs a model trained normally on all the data (trained by
the recipe's ``[train]`` stage, or loaded: ``model = "runs/x/model.pt"``): ``rounds`` (20) times,
one pass of gradient ascent on the suspected-poisoned set and one of cross-entropy on the
suspected-clean set, SGD at a fixed ``repair_lr`` (1e-4). The last round's model is the result;
``plateau_rounds`` ends the repair once the model's accuracy on the suspected-poisoned set (its
given labels) has levelled off (``bdframe.steps.plateaued``), after falling by at least ``plateau_fall``,
a rule that reads the training data only. The
reference picks the round with the best ACC - ASR on the poisoned *test* set, which is test
leakage, and bdframe never selects on the test set.

``d-st`` (secure training) trains a new model: the ``simclr`` stage in ``ss-ctl`` mode (labelled =
suspected clean, whose anchors take same-label positives; unlabelled = the rest, whose anchors
take only their other view), then the ``linear-probe`` stage with cross-entropy on the
suspected-clean set minus ``lam`` (0.001) times cross-entropy on the suspected-poisoned set,
on the frozen backbone. The uncertain samples train the backbone but not the head.

Both report the suspected-poisoned set (``suspected.csv``, detection recall and precision) and
the FCT scores (AUROC). Every step is a checkpoint, so ``--resume`` continues a run.
"""

from __future__ import annotations

from typing import Any

import attrs

from bdframe import hookimpl, steps
from bdframe.config import in_range, starting_model_field
from bdframe.interfaces import Defense, DefenseResult


@attrs.frozen
class FctSplitConfig:
    """The FCT split's fields, shared by both defenses."""

    alpha_clean: float = attrs.field(default=0.20, validator=in_range(0, 1, lo_open=True, hi_open=True), metadata={
        "help": "FCT split: share of samples taken as clean (lowest FCT)"})
    alpha_poison: float = attrs.field(default=0.05, validator=in_range(0, 1, lo_open=True, hi_open=True), metadata={
        "help": "FCT split: share of samples flagged as poisoned (highest FCT)"})
    notrans_epochs: int = attrs.field(default=2, validator=in_range(0, None), metadata={
        "help": "scoring model: epochs of plain training without augmentation"})
    intra_epochs: int = attrs.field(default=10, validator=in_range(0, None), metadata={
        "help": "scoring model: epochs of the class-separation stage after that"})
    intra_stop_gap: float = attrs.field(default=0.0, validator=in_range(0, None), metadata={
        "help": "scoring model: end the class-separation stage early once an epoch's mean loss is within "
                "this distance of the loss's floor (the class-separation stage's stop_gap); 0: all intra_epochs"})
    scoring_lr: float = attrs.field(default=0.01, validator=in_range(0, None, lo_open=True), metadata={
        "help": "scoring model: learning rate of both phases (SGD, momentum 0.9, constant)"})
    fct: dict[str, Any] = attrs.field(factory=dict, metadata={
        "help": "parameters of the fct scorer (transforms, ...), a table"})

    def check(self):
        if self.alpha_clean + self.alpha_poison > 1:
            return [("alpha_poison", f"alpha_clean + alpha_poison must be <= 1, got "
                                     f"{self.alpha_clean} + {self.alpha_poison}")]
        return []


def _check_split(config, registry) -> list:
    from bdframe.recipe import table_problems

    problems = table_problems(registry, "scorer", "fct", "fct", dict(config.fct), owned=("alpha_clean", "alpha_poison"))
    if not registry.has("trainer", "class-separation"):
        problems.append(("fct", registry.unknown_message("trainer", "class-separation")))
    return problems


def fct_split(ctx, data, c, prefix: str) -> dict:
    """DBR's sample division: train the scoring model (plain training without augmentation,
    then the class-separation stage), score every sample with FCT, and split by the
    ``alpha_clean`` / ``alpha_poison`` quantiles. Returns ``{"scores", "clean", "uncertain",
    "poisoned"}`` (scores in ``data``'s row order; the others id tensors). A checkpoint."""
    from bdframe.interfaces import ScoreContext
    from bdframe.seeding import derive_seed

    plain = ctx.component("trainer", "standard", epochs=c.notrans_epochs, lr=c.scoring_lr, momentum=0.9,
                          weight_decay=5e-4, schedule="constant", crop_padding=0, flip=False, batch_size=128)
    separate = ctx.component("trainer", "class-separation", epochs=c.intra_epochs, lr=c.scoring_lr,
                             stop_gap=c.intra_stop_gap)
    scorer = ctx.component("scorer", "fct", alpha_clean=c.alpha_clean, alpha_poison=c.alpha_poison, **c.fct)
    cp = ctx.checkpoint(f"{prefix}-fct-split")
    done = cp.load()
    if done is not None:
        return done
    model = ctx.new_model()
    steps.train(ctx, f"{prefix}-scoring-plain", model, plain, data, lr_setting="[defense] scoring_lr")
    steps.train(ctx, f"{prefix}-scoring-separate", model, separate, data, lr_setting="[defense] scoring_lr")
    sctx = ScoreContext(seed=derive_seed(ctx.seed, prefix, "fct"), device=ctx.device, batch_size=256,
                        progress=ctx.progress)
    scores = scorer.score(model, data, sctx).double().cpu()
    clean, uncertain, poisoned = scorer.partition(scores)
    done = {"scores": scores, "clean": data.ids[clean].clone(), "uncertain": data.ids[uncertain].clone(),
            "poisoned": data.ids[poisoned].clone()}
    ctx.log({"stage": f"{prefix}-fct-split", "clean": int(clean.sum()), "uncertain": int(uncertain.sum()),
             "poisoned": int(poisoned.sum())})
    cp.save(done)
    return done


def _split_line(name: str, split: dict, n: int) -> str:
    sizes = {k: len(split[k]) for k in ("clean", "uncertain", "poisoned")}
    return (f"{name}: FCT split of {n} samples: {sizes['clean']} suspected clean, {sizes['uncertain']} uncertain, "
            f"{sizes['poisoned']} suspected poisoned")


@attrs.frozen
class DBRConfig(FctSplitConfig):
    model: str = starting_model_field()
    rounds: int = attrs.field(default=20, validator=in_range(0, None), metadata={
        "help": "repair rounds: one unlearning pass on the suspected-poisoned set, one learning pass on the clean"})
    repair_lr: float = attrs.field(default=1e-4, validator=in_range(0, None, lo_open=True), metadata={
        "help": "learning rate of both passes (SGD, momentum 0.9, weight decay 5e-4, constant)"})
    batch_size: int = attrs.field(default=128, validator=in_range(1, None))
    evaluate_each_round: bool = attrs.field(default=False, metadata={
        "help": "clean ACC and ASR after every round (reporting only; one test pass per round)"})
    plateau_rounds: int = attrs.field(default=0, validator=in_range(0, None), metadata={
        "help": "stop once the model's accuracy on the suspected-poisoned set (its given labels, no "
                "augmentation) has stopped falling: its lowest value fell by less than plateau_share of "
                "its whole fall over the last plateau_rounds rounds; rounds is then the most rounds. "
                "0: always run all rounds"})
    plateau_share: float = attrs.field(default=0.05, validator=in_range(0, 1, lo_open=True), metadata={
        "help": "the share of the fall that the last plateau_rounds rounds must stay under to stop"})
    plateau_fall: float = attrs.field(default=0.0, validator=in_range(0, 1, hi_open=True), metadata={
        "help": "the least fall of that accuracy (0.1: ten points) before the repair may stop; a smaller "
                "dip is taken for noise and the repair goes on (at most rounds). 0: any fall"})


class DBR(Defense):
    name = "d-br"
    Config = DBRConfig
    summary = "DBR backdoor removal: FCT split, then alternate unlearning the suspected-poisoned and relearning the clean"

    @classmethod
    def check_components(cls, config, registry):
        return _check_split(config, registry)

    def run(self, data, ctx):
        """FCT split, the model to repair, then the alternating rounds; see the module text."""
        c = self.config
        n = len(data)
        if n == 0:
            raise ValueError("d-br: the training set is empty")
        for stage in steps.REPAIR_STAGES:  # fail before training when a stage is missing
            ctx.component("trainer", stage)
        model, start = steps.starting_model(ctx, "dbr-train", data, path=c.model)  # the plain run's model
        split = fct_split(ctx, data, c, "dbr")
        forget = data.subset(data.contains(split["poisoned"]))
        clean = data.subset(data.contains(split["clean"]))
        done = steps.repair(ctx, "dbr", model, forget, clean, start=start["eval"], lr=c.repair_lr, rounds=c.rounds,
                            batch_size=c.batch_size, lr_setting="[defense] repair_lr",
                            plateau_rounds=c.plateau_rounds, plateau_share=c.plateau_share,
                            plateau_fall=c.plateau_fall, evaluate_each_round=c.evaluate_each_round)
        trend, fits0 = done["trend"], done["trend"][0]["fit_poisoned"]
        final = trend[-1]
        why = (f" (stopped: the accuracy on the suspected-poisoned set levelled off at "
               f"{100 * final['fit_poisoned']:.1f}%, from {100 * fits0:.1f}%)" if done["stopped"] else "")
        summary = [_split_line("d-br", split, n),
                   steps.start_line("d-br", c.model, start["eval"]),
                   f"d-br: after {final['round']} rounds of unlearning and relearning{why}: {steps.figures(final)}"]
        metrics = {"split": {k: len(split[k]) for k in ("clean", "uncertain", "poisoned")}, "trend": trend,
                   "rounds": final["round"],
                   "stage_seconds": {"train": start["seconds"], "repair": done["seconds"], "fit": done["fit_seconds"]}}
        return DefenseResult(model=model, suspected_ids=split["poisoned"].clone(), scores=split["scores"],
                             metrics=metrics, summary=summary)


@attrs.frozen
class DSTConfig(FctSplitConfig):
    simclr: dict[str, Any] = attrs.field(factory=dict, metadata={
        "help": "parameters of the simclr stage (SS-CTL pre-training), a table"})
    linear: dict[str, Any] = attrs.field(factory=dict, metadata={
        "help": "parameters of the linear-probe stage (mixed CE on the frozen backbone), a table"})


#: D-ST's settings of its stages where they differ from the stages' defaults
DST_DEFAULTS = {
    "simclr": {"mode": "ss-ctl", "epochs": 200, "lr": 0.5, "temperature": 0.1, "weight_decay": 1e-4,
               "blur_p": 0.0, "warmup_epochs": 10.0},
    "linear": {"loss": "ce", "lam": 0.001, "optimizer": "sgd", "lr": 5.0, "momentum": 0.9, "batch_size": 512,
               "weight_decay": 0.0, "schedule": "constant"},
}
DST_STAGES = {"simclr": ("simclr", ("mode",)), "linear": ("linear-probe", ())}


class DST(Defense):
    name = "d-st"
    Config = DSTConfig
    summary = "DBR secure training: FCT split, SS-CTL pre-training, a head trained by mixed CE on the frozen backbone"

    @classmethod
    def check_components(cls, config, registry):
        from bdframe.recipe import table_problems

        return _check_split(config, registry) + [
            p for table, (stage, owned) in DST_STAGES.items()
            for p in table_problems(registry, "trainer", stage, table, dict(getattr(config, table)),
                                    defaults=DST_DEFAULTS[table], owned=owned)]

    def run(self, data, ctx):
        """FCT split, SS-CTL backbone, mixed-CE head; see the module text."""
        from bdframe.interfaces import StageData

        c = self.config
        n = len(data)
        if n == 0:
            raise ValueError("d-st: the training set is empty")
        ssl = ctx.component("trainer", "simclr", **{**DST_DEFAULTS["simclr"], **c.simclr})
        head = ctx.component("trainer", "linear-probe", **{**DST_DEFAULTS["linear"], **c.linear})
        split = fct_split(ctx, data, c, "dst")
        clean = data.subset(data.contains(split["clean"]))
        poisoned = data.subset(data.contains(split["poisoned"]))
        rest = data.subset(~data.contains(split["clean"]))
        model = ctx.new_model()
        done_ssl = steps.train(ctx, "dst-ss-ctl", model, ssl, StageData(clean, unlabelled=rest),
                               lr_setting="[defense] simclr.lr")
        done_head = steps.train(ctx, "dst-linear", model, head, StageData(clean, forget=poisoned),
                                lr_setting="[defense] linear.lr")
        summary = [_split_line("d-st", split, n),
                   f"d-st: after SS-CTL pre-training and the mixed-CE head: {steps.figures(done_head['eval'])}"]
        metrics = {"split": {k: len(split[k]) for k in ("clean", "uncertain", "poisoned")},
                   "stage_seconds": {"ss_ctl": done_ssl["seconds"], "linear": done_head["seconds"]}}
        return DefenseResult(model=model, suspected_ids=split["poisoned"].clone(), scores=split["scores"],
                             metrics=metrics, summary=summary)


@hookimpl
def bdframe_register_defenses(registry):
    registry.add(DBR)
    registry.add(DST)
