"""``detect``: find the suspected samples of a training set with any sample scorer.

1. The model: a fresh one trained on the untrusted data with the recipe's ``[train]`` stage, or
   the weights of an earlier run (``model = "runs/x/model.pt"``), which must fit the recipe's
   ``[model]``.
2. Every training sample is scored with ``scorer`` and its parameters ``params`` (a table), in
   eval mode; higher = more suspicious.
3. The scorer's own split rule, where it has one, flags the suspected samples; a scorer without
   one flags nothing but still ranks every sample.

4. With ``retrain = true``: a fresh model is trained with the recipe's ``[train]`` stage on the
   samples left unflagged (the removal-and-retraining step of the Activation Clustering and
   Spectral Signatures papers), and is the run's model. With ``unlearn`` > 0 it is trained by the
   ``mixed`` stage instead, which also unlearns the flagged samples, each weighing ``unlearn``
   times a kept one, its ascent capped at ``-ln(unlearn_below)``: poisoned samples that
   detection misses are then outweighed by the ones it flags (bdframe's choice, as MeCa's
   ``clean_unlearn``).

Without ``retrain`` the model is returned unchanged: detection, not removal. ``suspected.csv``
lists the flagged samples with their files, most suspicious first; with an attack,
``metrics.json`` gets recall and precision of the flagged set and the scores' AUROC and TPR at
1/5/10% FPR. Useful on its own (which of my files are poisoned?) and to compare scorers in a sweep.
"""

from __future__ import annotations

from typing import Any

import attrs

from bdframe import hookimpl, steps
from bdframe.config import in_range, starting_model_field
from bdframe.interfaces import Defense, DefenseResult


@attrs.frozen
class DetectConfig:
    scorer: str = attrs.field(default="activation-clustering", metadata={
        "help": "the sample scorer (see `bdframe plugins`)"})
    params: dict[str, Any] = attrs.field(factory=dict, metadata={
        "help": "the scorer's parameters, a table (e.g. {n_overlays = 16})"})
    model: str = starting_model_field("score with")
    score_batch_size: int = attrs.field(default=256, validator=in_range(1, None))
    retrain: bool = attrs.field(default=False, metadata={
        "help": "train a fresh model with the [train] stage on the samples left unflagged, and return it"})
    unlearn: float = attrs.field(default=0.0, validator=in_range(0, None), metadata={
        "help": "retrain: 0 drops the flagged samples; > 0 trains with the mixed stage, unlearning them "
                "(a flagged sample weighs this many times a kept one)"})
    unlearn_below: float = attrs.field(default=0.1, validator=in_range(0, 1, lo_open=True, hi_open=True), metadata={
        "help": "unlearn > 0: a flagged sample is unlearned until its probability of its label falls below this"})
    evaluate_each_epoch: bool = attrs.field(default=False, metadata={
        "help": "log clean ACC and ASR after every training epoch"})


class Detect(Defense):
    name = "detect"
    Config = DetectConfig
    summary = "score every training sample with a scorer, flag by its rule; optionally retrain without the flagged"

    @classmethod
    def check_components(cls, config, registry):
        if not registry.has("scorer", config.scorer):
            return [("scorer", registry.unknown_message("scorer", config.scorer))]
        from bdframe.recipe import table_problems

        problems = table_problems(registry, "scorer", config.scorer, "params", dict(config.params))
        if config.retrain and not callable(getattr(registry.get("scorer", config.scorer), "flag", None)):
            problems.append(("retrain", f"scorer {config.scorer!r} ranks without flagging, so there is nothing to "
                                        f"retrain without; choose a scorer with a split rule (see `bdframe plugins`)"))
        if config.unlearn > 0 and not config.retrain:
            problems.append(("unlearn", "unlearns the flagged samples while retraining: set retrain = true, or "
                                        "unlearn = 0"))
        return problems

    def run(self, data, ctx):
        import torch

        from bdframe.interfaces import ScoreContext
        from bdframe.seeding import derive_seed

        c = self.config
        scorer = ctx.component("scorer", c.scorer, **c.params)
        # refused before any training: the recipe's stage must suit the unlearning
        retrainer = None
        if c.retrain:
            retrainer = steps.unlearning_trainer(ctx, c.unlearn, c.unlearn_below, "detect", "unlearn") \
                if c.unlearn > 0 else ctx.component("trainer")
        model, done = steps.starting_model(ctx, "detect-train", data, path=c.model,
                                           evaluate_each_epoch=c.evaluate_each_epoch)
        sctx = ScoreContext(seed=derive_seed(ctx.seed, "detect", c.scorer), device=ctx.device,
                            batch_size=c.score_batch_size, progress=ctx.progress)
        cp = ctx.checkpoint("detect-score")
        scored = cp.load()
        if scored is None:
            import time

            t0 = time.perf_counter()
            scores = scorer.score(model, data, sctx).double().cpu()
            flag = getattr(scorer, "flag", None)
            flags = flag(scores, data) if callable(flag) else None
            scored = {"scores": scores, "flags": flags, "seconds": time.perf_counter() - t0}
            cp.save(scored)
        flags = scored["flags"]
        suspected = data.ids[torch.as_tensor(flags, dtype=torch.bool)].clone() if flags is not None else \
            torch.empty(0, dtype=torch.int64)
        n = len(data)
        seconds = {"train": done["seconds"], "score": scored["seconds"]}
        retrained = None
        if c.retrain:
            keep = data.subset(~data.contains(suspected))
            forget = data.subset(data.contains(suspected)) if c.unlearn > 0 and len(suspected) else None
            if len(keep) == 0:
                raise ValueError(f"detect: {c.scorer} flagged every sample, so there is nothing to retrain on")
            model = ctx.new_model()
            redone = steps.train(ctx, "detect-retrain", model, retrainer, keep, lr_setting="[train] lr",
                                 evaluate_each_epoch=c.evaluate_each_epoch, forget=forget)
            seconds["retrain"] = redone["seconds"]
            retrained = {"train_size": len(keep), "unlearned": 0 if forget is None else len(forget),
                         "eval": redone["eval"]}
        summary = [f"detect: the model scored ({'loaded from ' + c.model if c.model else 'trained here'}): "
                   f"{steps.figures(done['eval'])}",
                   f"detect: {c.scorer} flagged {len(suspected)} of {n} samples ({100 * len(suspected) / max(n, 1):.1f}%)"
                   + ("" if flags is not None else " (it has no split rule: see the scores in suspected.csv)")]
        if retrained is not None:
            how = f", unlearning the {retrained['unlearned']} flagged" if c.unlearn > 0 else ""
            summary.append(f"detect: retrained on the {retrained['train_size']} unflagged samples{how}: "
                           f"{steps.figures(retrained['eval'])}")
        metrics = {"scorer": c.scorer, "params": dict(c.params), "has_rule": flags is not None,
                   "stage_seconds": seconds, "retrain": retrained,
                   "score_images_per_s": n / scored["seconds"] if scored["seconds"] > 0 else None}
        return DefenseResult(model=model, suspected_ids=suspected, scores=scored["scores"], metrics=metrics,
                             summary=summary)


@hookimpl
def bdframe_register_defenses(registry):
    registry.add(Detect)
