"""``dbd``: backdoor defense by decoupling the training process (Huang et al., ICLR 2022).

A backdoor is learned when a model is trained end to end on poisoned labels, because the
trigger is the easiest feature that explains the target label. DBD trains the parts apart:

1. **Self-supervised backbone**: the ``simclr`` stage on every training image with its labels
   ignored. Poisoned images do not share a label any more, only a small pattern that strong
   augmentation mostly destroys, so they do not cluster together in feature space.
2. **Linear probe**: the ``linear-probe`` stage trains the classifier head on the frozen backbone
   with symmetric cross-entropy (robust to wrong labels). The head cannot bend the features to
   the trigger, so the poisoned samples keep a high loss under their (target) label.
3. **Semi-supervised fine-tuning**: the ``mixmatch`` stage fine-tunes the whole model; before
   every epoch it keeps the labels of the ``credible_share`` (epsilon, 50%) of samples with the
   lowest symmetric cross-entropy under the current model and treats the rest, the
   "low-credible" samples, as unlabelled (``split_by = "class"``: the share is taken within each
   given label; see docs/dbd.md for why a weak backbone needs it). Poisoned samples land in the unlabelled half, where
   their labels cannot teach the trigger.

The samples outside the credible share under the final model are the suspected set
(``suspected.csv``, detection recall and precision in ``metrics.json``), their symmetric
cross-entropy the per-sample suspicion. The linear probe's clean accuracy is reported: it is the
ceiling of what the backbone gives the later stages. Each stage is a checkpoint and saves its
state every epoch, so ``bdframe run --resume`` continues where a run stopped. The three tables
``simclr``, ``linear`` and ``semi`` set the stages' parameters (see each stage's reference).
"""

from __future__ import annotations

from typing import Any

import attrs

from bdframe import hookimpl, steps
from bdframe.config import in_range, one_of
from bdframe.interfaces import Defense, DefenseResult

#: each table of the config -> the stage it configures, and the fields the defense sets itself
STAGES = {"simclr": ("simclr", ()), "linear": ("linear-probe", ()), "semi": ("mixmatch", ("credible_share", "split_by"))}
#: DBD's own settings of the stages where they differ from the stages' defaults
DEFAULTS = {"simclr": {"mode": "simclr"}, "linear": {"loss": "sce", "alpha": 0.1, "beta": 1.0}, "semi": {}}


@attrs.frozen
class DBDConfig:
    credible_share: float = attrs.field(default=0.5, validator=in_range(0, 1, lo_open=True, hi_open=True), metadata={
        "help": "epsilon: share of samples whose labels are kept each semi-supervised epoch (lowest SCE)"})
    split_by: str = attrs.field(default="all", validator=one_of("all", "class"), metadata={
        "help": "credible split: \"all\" keeps the lowest-loss share of the whole set (the paper); \"class\" "
                "the share within each given label, so a class the backbone separates poorly keeps labels"})
    simclr: dict[str, Any] = attrs.field(factory=dict, metadata={
        "help": "parameters of the simclr stage (self-supervised backbone), a table"})
    linear: dict[str, Any] = attrs.field(factory=dict, metadata={
        "help": "parameters of the linear-probe stage (frozen backbone, symmetric CE), a table"})
    semi: dict[str, Any] = attrs.field(factory=dict, metadata={
        "help": "parameters of the mixmatch stage (semi-supervised fine-tuning), a table"})
    evaluate_each_epoch: bool = attrs.field(default=True, metadata={
        "help": "log clean ACC and ASR after every linear-probe and semi-supervised epoch (for the trend plot)"})


class DBD(Defense):
    name = "dbd"
    Config = DBDConfig
    summary = "DBD: self-supervised backbone, linear probe, semi-supervised fine-tuning on the credible half"

    @classmethod
    def check_components(cls, config, registry):
        from bdframe.recipe import table_problems

        return [p for table, (stage, owned) in STAGES.items()
                for p in table_problems(registry, "trainer", stage, table, dict(getattr(config, table)),
                                        defaults=DEFAULTS[table], owned=owned)]

    def stage_component(self, ctx, table: str, **fixed):
        stage, _ = STAGES[table]
        return ctx.component("trainer", stage, **{**DEFAULTS[table], **dict(getattr(self.config, table)), **fixed})

    def run(self, data, ctx):
        """The three stages, then the final credible split; see the module text."""
        from bdframe.interfaces import ScoreContext, StageData
        from bdframe.losses import lowest_share
        from bdframe.scoring import sce_losses
        from bdframe.seeding import derive_seed

        c = self.config
        n = len(data)
        if n == 0:
            raise ValueError("dbd: the training set is empty")
        # every component up front, so a missing plugin or a rejected parameter fails before training
        simclr = self.stage_component(ctx, "simclr")
        linear = self.stage_component(ctx, "linear")
        semi = self.stage_component(ctx, "semi", credible_share=c.credible_share, split_by=c.split_by)

        model = ctx.new_model()
        # 1. the backbone, from the images alone (every sample unlabelled)
        empty = data.subset(data.ids[:0])
        done_ssl = steps.train(ctx, "dbd-simclr", model, simclr, StageData(empty, unlabelled=data),
                               lr_setting="[defense] simclr.lr")
        # 2. the head on the frozen backbone
        done_lin = steps.train(ctx, "dbd-linear", model, linear, data, lr_setting="[defense] linear.lr",
                               evaluate_each_epoch=c.evaluate_each_epoch)
        # 3. semi-supervised fine-tuning of the whole model on the credible share, re-split every epoch
        done_semi = steps.train(ctx, "dbd-semi", model, semi, data, lr_setting="[defense] semi.lr",
                                evaluate_each_epoch=c.evaluate_each_epoch)

        # the suspected set: the samples outside the credible share under the final model
        sctx = ScoreContext(seed=derive_seed(ctx.seed, "dbd", "split"), device=ctx.device, batch_size=512,
                            progress=ctx.progress)
        scores = sce_losses(model, data, sctx, alpha=semi.config.split_alpha, beta=semi.config.split_beta,
                            desc="dbd final split").double()
        keep = lowest_share(scores, c.credible_share, data.ids, data.labels if c.split_by == "class" else None)
        suspected = data.ids[~keep].clone()
        ctx.log({"stage": "dbd-split", "credible": int(keep.sum()), "low_credible": int((~keep).sum())})

        stage_evals = {"simclr": done_ssl["eval"], "linear": done_lin["eval"], "semi": done_semi["eval"]}
        per_epoch = [r for r in done_lin.get("history", []) + done_semi.get("history", []) if "clean_acc" in r]
        plot = None
        if ctx.artifacts is not None and per_epoch:
            from bdframe import plots

            drawn = plots.trend([r["clean_acc"] for r in per_epoch], [r.get("asr") for r in per_epoch],
                                ctx.artifacts / "dbd_trend.png",
                                title="DBD: clean accuracy and attack success rate per epoch",
                                xlabel=f"epoch (1-{len(done_lin.get('history', []))}: linear probe, "
                                       "then semi-supervised fine-tuning)")
            plot = drawn["file"] if drawn else None
        seconds = {"simclr": done_ssl["seconds"], "linear": done_lin["seconds"], "semi": done_semi["seconds"]}
        metrics = {"stages": stage_evals, "linear_probe_clean_acc": done_lin["eval"]["clean_acc"],
                   "split": {"credible": int(keep.sum()), "low_credible": int((~keep).sum())},
                   "stage_seconds": seconds, "plot": plot}
        summary = [f"dbd: linear probe on the self-supervised backbone: {steps.figures(done_lin['eval'])}",
                   f"dbd: after semi-supervised fine-tuning: {steps.figures(done_semi['eval'])}",
                   f"dbd: {len(suspected)} of {n} samples ({100 * len(suspected) / n:.1f}%) are low-credible "
                   f"(outside the {100 * c.credible_share:g}% with the lowest loss)"]
        return DefenseResult(model=model, suspected_ids=suspected, scores=scores, metrics=metrics, summary=summary)


@hookimpl
def bdframe_register_defenses(registry):
    registry.add(DBD)
