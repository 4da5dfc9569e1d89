"""``detect``: find the suspected samples of a training set with any sample scorer.

1. The model: a fresh one trained on the untrusted data with the recipe's ``[train]`` stage, or
   the weights of an earlier run (``model = "runs/x/model.pt"``), which must fit the recipe's
   ``[model]``.
2. Every training sample is scored with ``scorer`` and its parameters ``params`` (a table), in
   eval mode; higher = more suspicious.
3. The scorer's own split rule, where it has one, flags the suspected samples; a scorer without
   one flags nothing but still ranks every sample.

The model is returned unchanged: this is detection, not removal. ``suspected.csv`` lists the
flagged samples with their files, most suspicious first; with an attack, ``metrics.json`` gets
recall and precision of the flagged set and the scores' AUROC and TPR at 1/5/10% FPR. Useful
on its own (which of my files are poisoned?) and to compare scorers in a sweep.
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
    evaluate_each_epoch: bool = attrs.field(default=False, metadata={
        "help": "log clean ACC and ASR after every training epoch"})


class Detect(Defense):
    name = "detect"
    Config = DetectConfig
    summary = "detection only: score every training sample with a scorer, flag by its rule"

    @classmethod
    def check_components(cls, config, registry):
        if not registry.has("scorer", config.scorer):
            return [("scorer", registry.unknown_message("scorer", config.scorer))]
        from bdframe.recipe import table_problems

        return table_problems(registry, "scorer", config.scorer, "params", dict(config.params))

    def run(self, data, ctx):
        import torch

        from bdframe.interfaces import ScoreContext
        from bdframe.seeding import derive_seed

        c = self.config
        scorer = ctx.component("scorer", c.scorer, **c.params)
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
        summary = [f"detect: the model scored ({'loaded from ' + c.model if c.model else 'trained here'}): "
                   f"{steps.figures(done['eval'])}",
                   f"detect: {c.scorer} flagged {len(suspected)} of {n} samples ({100 * len(suspected) / max(n, 1):.1f}%)"
                   + ("" if flags is not None else " (it has no split rule: see the scores in suspected.csv)")]
        metrics = {"scorer": c.scorer, "params": dict(c.params), "has_rule": flags is not None,
                   "stage_seconds": {"train": done["seconds"], "score": scored["seconds"]},
                   "score_images_per_s": n / scored["seconds"] if scored["seconds"] > 0 else None}
        return DefenseResult(model=model, suspected_ids=suspected, scores=scored["scores"], metrics=metrics,
                             summary=summary)


@hookimpl
def bdframe_register_defenses(registry):
    registry.add(Detect)
