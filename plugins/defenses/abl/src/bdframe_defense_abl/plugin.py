"""``abl``: anti-backdoor learning (Li et al., NeurIPS 2021).

A backdoor is learned faster than the clean task, so early in training the poisoned samples
have the lowest loss. ABL turns that into a defense in four steps:

1. **Pre-isolation**: train a fresh model on the untrusted data for ``isolation_epochs`` with
   local gradient ascent, ``sign(l - gamma) * l``: descent while a batch's loss is above
   ``gamma`` and ascent below it, so the fast-learned (poisoned) samples stay near ``gamma``
   while the rest keep a higher loss (``isolation_objective = "flooding"``: ``|l - b| + b``).
   The bound applies to the batch-mean loss, as every reference implementation does
   (``per_sample = true`` applies it per sample, as the paper writes it).
2. **Isolation**: score every sample with the ``loss`` scorer (``log p_y(x)``, eval mode, no
   augmentation) and isolate the ``floor(isolation_ratio * N)`` lowest-loss samples.
3. **Fine-tuning**: continue training the same model on the other samples with the recipe's
   ``[train]`` stage.
4. **Unlearning**: gradient ascent (``-CE``) on the isolated samples for ``unlearn_epochs`` at
   ``unlearn_lr``.

The isolated samples are the defense's suspected set (``suspected.csv``, detection recall and
precision), their scores its per-sample suspicion. Each finished step is a checkpoint, so
``--resume`` continues where the run stopped.
"""

from __future__ import annotations

import attrs

from bdframe import hookimpl, steps
from bdframe.config import in_range, one_of
from bdframe.interfaces import Defense, DefenseResult


@attrs.frozen
class ABLConfig:
    isolation_epochs: int = attrs.field(default=20, validator=in_range(0, None), metadata={
        "help": "epochs of pre-isolation training with the LGA (or flooding) bound"})
    isolation_lr: float = attrs.field(default=0.1, validator=in_range(0, None, lo_open=True), metadata={
        "help": "pre-isolation learning rate (constant)"})
    isolation_objective: str = attrs.field(default="lga", validator=one_of("lga", "flooding"), metadata={
        "help": "lga: sign(CE - gamma) * CE; flooding: |CE - flood_level| + flood_level"})
    gamma: float = attrs.field(default=0.5, validator=in_range(0, None), metadata={"help": "LGA threshold"})
    flood_level: float = attrs.field(default=0.5, validator=in_range(0, None), metadata={
        "help": "flooding level (isolation_objective = flooding)"})
    per_sample: bool = attrs.field(default=False, metadata={
        "help": "apply the bound to each sample's loss instead of the batch mean"})
    isolation_ratio: float = attrs.field(default=0.01, validator=in_range(0, 1, hi_open=True), metadata={
        "help": "share of the training set isolated (lowest loss)"})
    finetune: bool = attrs.field(default=True, metadata={
        "help": "fine-tune on the non-isolated samples with the recipe's [train] stage before unlearning"})
    unlearn_epochs: int = attrs.field(default=20, validator=in_range(0, None), metadata={
        "help": "epochs of gradient ascent on the isolated samples"})
    unlearn_lr: float = attrs.field(default=5e-4, validator=in_range(0, None, lo_open=True), metadata={
        "help": "unlearning learning rate (constant)"})
    batch_size: int = attrs.field(default=128, validator=in_range(1, None), metadata={
        "help": "batch size of pre-isolation and unlearning"})
    momentum: float = attrs.field(default=0.9, validator=in_range(0, 1, hi_open=True))
    weight_decay: float = attrs.field(default=1e-4, validator=in_range(0, None))
    augment: bool = attrs.field(default=True, metadata={
        "help": "random crop and flip in pre-isolation and unlearning"})
    evaluate_each_epoch: bool = attrs.field(default=True, metadata={
        "help": "log clean ACC and ASR after every epoch (costs one pass over the test sets)"})
    score_batch_size: int = attrs.field(default=512, validator=in_range(1, None))


class ABL(Defense):
    name = "abl"
    Config = ABLConfig
    summary = "ABL: isolate the lowest-loss samples under LGA training, fine-tune on the rest, unlearn them"

    def _optim(self) -> dict:
        c = self.config
        return {"batch_size": c.batch_size, "momentum": c.momentum, "nesterov": True,
                "weight_decay": c.weight_decay, "schedule": "constant",
                "crop_padding": 4 if c.augment else 0, "flip": c.augment}

    def run(self, data, ctx):
        """Pre-isolation, isolation, fine-tuning and unlearning; each finished step is a checkpoint."""
        import torch

        from bdframe.interfaces import ScoreContext
        from bdframe.seeding import derive_seed

        c = self.config
        n = len(data)
        if n == 0:
            raise ValueError("abl: the training set is empty")
        # every component up front, so a missing plugin or a rejected parameter fails before training
        isolator = ctx.component("trainer", "unlearning", epochs=c.isolation_epochs, lr=c.isolation_lr,
                                 objective=c.isolation_objective, lga_gamma=c.gamma, flood_level=c.flood_level,
                                 per_sample=c.per_sample, **self._optim())
        scorer = ctx.component("scorer", "loss", isolation_ratio=c.isolation_ratio)
        finetuner = ctx.component("trainer") if c.finetune else None
        unlearner = ctx.component("trainer", "unlearning", epochs=c.unlearn_epochs, lr=c.unlearn_lr,
                                  objective="ascent", **self._optim())
        seconds: dict = {}
        trend: list = []

        def step(name: str, model, trainer, train_set, setting: str) -> None:
            done = steps.train(ctx, name, model, trainer, train_set, lr_setting=setting,
                               evaluate_each_epoch=c.evaluate_each_epoch)
            seconds[name.removeprefix("abl-")] = done["seconds"]
            trend.append({"step": name.removeprefix("abl-"), **done["eval"]})

        # 1. pre-isolation: LGA training from scratch
        model = ctx.new_model()
        step("abl-isolation", model, isolator, data, "[defense] isolation_lr")

        # 2. isolation: the lowest-loss share of the samples
        sctx = ScoreContext(seed=derive_seed(ctx.seed, "abl", "isolate"), device=ctx.device,
                            batch_size=c.score_batch_size, progress=ctx.progress)
        cp = ctx.checkpoint("abl-isolate")
        iso = cp.load()
        if iso is None:
            scores = scorer.score(model, data, sctx).double().cpu()
            flags = scorer.flag(scores, data)
            iso = {"scores": scores, "ids": data.ids[flags].clone()}
            cp.save(iso)
        scores, isolated_ids = iso["scores"], iso["ids"]
        isolated = data.subset(data.contains(isolated_ids))
        others = data.subset(~data.contains(isolated_ids))
        ctx.log({"stage": "abl-isolate", "isolated": len(isolated), "kept": len(others)})

        # 3. fine-tuning on the rest, 4. unlearning of the isolated samples
        if finetuner is not None:
            step("abl-finetune", model, finetuner, others, "[train] lr")
        if len(isolated) and c.unlearn_epochs:
            step("abl-unlearn", model, unlearner, isolated, "[defense] unlearn_lr")

        summary = [f"abl: after {c.isolation_epochs} epochs of {c.isolation_objective} training: {steps.figures(trend[0])}",
                   f"abl: isolated {len(isolated)} of {n} samples ({100 * len(isolated) / n:.1f}%) with the lowest loss"]
        what = {"finetune": "fine-tuning on the other samples", "unlearn": "unlearning the isolated samples"}
        summary += [f"abl: after {what[t['step']]}: {steps.figures(t)}" for t in trend[1:]]
        metrics = {"trend": trend, "split": {"isolated": len(isolated), "kept": len(others)},
                   "stage_seconds": seconds}
        return DefenseResult(model=model, suspected_ids=torch.as_tensor(isolated_ids).clone(), scores=scores,
                             metrics=metrics, summary=summary)


@hookimpl
def bdframe_register_defenses(registry):
    registry.add(ABL)
