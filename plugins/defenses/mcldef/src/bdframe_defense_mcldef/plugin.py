"""``mcldef``: model-contrastive learning for backdoor defense (Yue et al., 2022).

The defense repairs the model a plain run trains (trained here by the recipe's ``[train]``
stage, or loaded: ``model = "runs/x/model.pt"``) using the recipe's trusted clean data
(``[clean]``; the defense is refused without it):

1. **Trigger inversion** (:func:`bdframe.inversion.invert`): for every class, the smallest mask
   and pattern that send the clean images to that class (Adam at lr 0.1 as in Neural Cleanse,
   mask L1 weight 0.01, up to 30 epochs, a class stopping after 10 without improvement; MCLDef's
   code uses lr 0.005 for up to 100 epochs, which suits its 2,500 clean images but leaves a
   few hundred too few steps to converge). The class whose mask norm lies
   furthest below the others' (the median-absolute-deviation anomaly index) is taken as the
   target, without being told. The masks and patterns are saved as ``mcldef_inversion.png``.
2. **Model-contrastive purification**: a frozen copy of the backdoored model is the reference.
   For each clean image ``x`` and its stamped copy ``x'`` (the inverted trigger of the chosen
   class), the trained model's feature of ``x'`` is the anchor, the frozen model's feature of
   ``x`` the positive and its feature of ``x'`` the negative; the loss is the two-way softmax
   cross-entropy over their cosine similarities divided by ``temperature`` (0.5), with the
   positive as the target. 20 epochs of SGD (momentum 0.9, weight decay 1e-4, batch 64) at
   lr 0.1, then 0.01 from epoch 2 and 0.001 from epoch 11, with crop and flip.
   ``ce_weight`` > 0 adds that many times the cross-entropy on the clean images (the reference
   has no such term; 0 by default).

``min_anomaly_index`` (0: always purify, as the reference) returns the model as trained when the
inverted target's anomaly index is below it (Neural Cleanse's threshold is 2): purifying against
a trigger that does not stand out removes nothing and costs accuracy.

The defense flags no training samples: its inputs are the trusted clean data and the model.
"""

from __future__ import annotations

import copy

import attrs

from bdframe import hookimpl, steps
from bdframe.config import in_range, increasing, starting_model_field
from bdframe.interfaces import Defense, DefenseResult


@attrs.frozen
class MCLDefConfig:
    model: str = starting_model_field()
    inversion_lam: float = attrs.field(default=0.01, validator=in_range(0, None), metadata={
        "help": "trigger inversion: weight of the mask's L1 norm"})
    inversion_lr: float = attrs.field(default=0.1, validator=in_range(0, None, lo_open=True), metadata={
        "help": "trigger inversion: Adam learning rate"})
    inversion_epochs: int = attrs.field(default=30, validator=in_range(1, None), metadata={
        "help": "trigger inversion: most epochs over the clean data"})
    inversion_patience: int = attrs.field(default=10, validator=in_range(1, None), metadata={
        "help": "trigger inversion: a class stops after this many epochs without a smaller successful mask"})
    inversion_success: float = attrs.field(default=0.95, validator=in_range(0, 1), metadata={
        "help": "trigger inversion: share of stamped images a mask must send to its class to count"})
    inversion_batch_size: int = attrs.field(default=64, validator=in_range(1, None))
    epochs: int = attrs.field(default=20, validator=in_range(0, None), metadata={
        "help": "epochs of model-contrastive training on the clean data"})
    lr: float = attrs.field(default=0.1, validator=in_range(0, None, lo_open=True), metadata={
        "help": "initial learning rate (SGD, momentum 0.9), times 0.1 at each of milestones"})
    milestones: tuple[int, ...] = attrs.field(default=(1, 10), validator=increasing, metadata={
        "help": "epochs after which the learning rate is multiplied by 0.1"})
    batch_size: int = attrs.field(default=64, validator=in_range(1, None))
    weight_decay: float = attrs.field(default=1e-4, validator=in_range(0, None))
    temperature: float = attrs.field(default=0.5, validator=in_range(0, None, lo_open=True), metadata={
        "help": "temperature of the contrastive loss"})
    ce_weight: float = attrs.field(default=0.0, validator=in_range(0, None), metadata={
        "help": "weight of an added cross-entropy term on the clean images (0: none, as the reference)"})
    min_anomaly_index: float = attrs.field(default=0.0, validator=in_range(0, None), metadata={
        "help": "purify only if the inverted target's anomaly index reaches this (Neural Cleanse: 2); "
                "else return the model as trained. 0: always purify, as the reference"})
    evaluate_each_epoch: bool = attrs.field(default=False, metadata={
        "help": "clean ACC and ASR after every epoch (reporting only; one test pass per epoch)"})

    def check(self):
        if self.milestones and self.epochs and max(self.milestones) > self.epochs:
            return [("milestones", f"must be <= epochs ({self.epochs}), got {list(self.milestones)}")]
        return []


def mcl_loss(anchor, positive, negative, temperature: float):
    """The model-contrastive loss per sample: ``-log softmax([cos(a, p), cos(a, n)] / T)[0]``
    (cross-entropy with the positive as the target). Always >= 0; exactly ``log 2`` when the
    positive and the negative coincide."""
    import torch
    import torch.nn.functional as F

    sims = torch.stack([F.cosine_similarity(anchor, positive, dim=1),
                        F.cosine_similarity(anchor, negative, dim=1)], dim=1) / temperature
    return F.cross_entropy(sims, torch.zeros(len(sims), dtype=torch.int64, device=sims.device), reduction="none")


def purify(model, clean, trigger, ctx, c, stage_ctx):
    """Model-contrastive training of ``model`` on the ``clean`` images against a frozen copy of
    itself; ``trigger(x)`` stamps a batch with the inverted trigger."""
    import torch
    import torch.nn.functional as F

    from bdframe.training import OptimSettings, run_epochs

    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    s = OptimSettings(epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, momentum=0.9,
                      weight_decay=c.weight_decay, schedule="multistep", milestones=tuple(c.milestones),
                      gamma=0.1, amp="off")

    def loss_fn(model, b):
        stamped = trigger(b.x)
        anchor = model.features(stamped)
        with torch.no_grad():
            positive = reference.features(b.x)
            negative = reference.features(stamped)
        loss = mcl_loss(anchor.float(), positive.float(), negative.float(), c.temperature).mean()
        logits = model.head(anchor)
        if c.ce_weight:
            loss = loss + c.ce_weight * F.cross_entropy(model(b.x), b.y)
        return loss, logits

    return run_epochs(model, clean, stage_ctx, s, loss_fn, desc="mcldef")


class MCLDef(Defense):
    name = "mcldef"
    Config = MCLDefConfig
    clean_data = "required"
    summary = "MCLDef: invert the trigger on trusted clean data, then model-contrastive purification (needs [clean])"

    def run(self, data, ctx):
        """The model to repair, trigger inversion of every class, purification; see the module text."""
        from bdframe import inversion
        from bdframe.seeding import derive_seed

        c = self.config
        clean = steps.clean_data(ctx, "mcldef")
        model, start = steps.starting_model(ctx, "mcldef-train", data, path=c.model)

        cp = ctx.checkpoint("mcldef-inversion")
        inv = cp.load()
        if inv is None:
            import time

            t0 = time.perf_counter()
            found = inversion.invert(model, clean, lam=c.inversion_lam, lr=c.inversion_lr,
                                     epochs=c.inversion_epochs, patience=c.inversion_patience,
                                     success=c.inversion_success, batch_size=c.inversion_batch_size,
                                     seed=derive_seed(ctx.seed, "mcldef", "inversion"), device=ctx.device,
                                     progress=ctx.progress)
            inv = {"result": found, "seconds": time.perf_counter() - t0}
            ctx.log({"stage": "mcldef-inversion", **found.to_dict()})
            cp.save(inv)
        found = inv["result"]
        if ctx.artifacts is not None:
            inversion.save_pictures(found, clean, ctx.artifacts / "mcldef_inversion.png", classes=ctx.info.classes)

        def trigger(x):
            return inversion.apply_trigger(x, found)

        purified = found.index() >= c.min_anomaly_index
        if purified:
            done = steps.run(ctx, "mcldef-purify", model,
                             lambda: {"history": purify(model, clean, trigger, ctx, c, ctx.stage(
                                 "mcldef-purify-train", evaluate_each_epoch=c.evaluate_each_epoch,
                                 lr_setting="[defense] lr"))})
        else:
            done = {"eval": start["eval"], "seconds": 0.0}
        classes = ctx.info.classes
        name = classes[found.target] if found.target < len(classes) else str(found.target)
        summary = [steps.start_line("mcldef", c.model, start["eval"]),
                   f"mcldef: inverted target class {found.target} ({name}), anomaly index {found.index():.2f} "
                   f"(mask L1 norm {float(found.norms[found.target]):.1f}; median of all classes "
                   f"{float(found.norms.median()):.1f}); {len(clean)} clean images",
                   f"mcldef: after {c.epochs} epochs of model-contrastive training: {steps.figures(done['eval'])}"
                   if purified else
                   f"mcldef: no class stands out (index {found.index():.2f} < min_anomaly_index "
                   f"{c.min_anomaly_index:g}): the model is returned as trained"]
        metrics = {"inversion": found.to_dict(), "clean_images": len(clean), "purified": purified,
                   "trend": [{"step": "start", **start["eval"]}, {"step": "purified", **done["eval"]}],
                   "stage_seconds": {"train": start["seconds"], "inversion": inv["seconds"],
                                     "purify": done["seconds"]}}
        return DefenseResult(model=model, metrics=metrics, summary=summary)


@hookimpl
def bdframe_register_defenses(registry):
    registry.add(MCLDef)
