"""``scanft``: SCAn detection with trusted clean data, then unlearning of what it flags (the
SCAnFT baseline of the MeCa paper; SCAn is Tang et al., USENIX Security 2021).

1. **The model**: the model the ``none`` defense trains with the same recipe (trained here, or
   loaded: ``model = "runs/x/model.pt"``).
2. **Detection**: the ``scan`` scorer on the model's penultimate features of the untrusted
   training set, with the recipe's ``[clean]`` data as its trusted reference (its global
   covariance model is fitted on the clean data alone, and in a flagged class the poisoned group
   is the one holding fewer clean samples). A class is flagged when its anomaly index exceeds
   the scorer's ``threshold``; the members of its candidate group are the suspected samples.
   ``scan = {...}`` passes other parameters to the scorer.
3. **Unlearning**: the ``unlearning`` stage on the flagged samples with flooding (``|CE - b| +
   b``, b = ``flood_level`` 0.5), ``epochs`` (5) at ``lr`` (5e-4), the settings BackdoorBench's
   detection configurations use (the MeCa paper's learning rate is not given). With nothing
   flagged the model is returned as trained.

Reports the flagged samples (``suspected.csv``, detection recall and precision) and the
scorer's per-sample scores (AUROC).
"""

from __future__ import annotations

from typing import Any

import attrs

from bdframe import hookimpl, steps
from bdframe.config import in_range, starting_model_field
from bdframe.interfaces import Defense, DefenseResult


@attrs.frozen
class ScanFTConfig:
    model: str = starting_model_field()
    scan: dict[str, Any] = attrs.field(factory=dict, metadata={
        "help": "parameters of the scan scorer (threshold, score_mode, ...), a table"})
    epochs: int = attrs.field(default=5, validator=in_range(0, None), metadata={
        "help": "epochs of unlearning the flagged samples"})
    lr: float = attrs.field(default=5e-4, validator=in_range(0, None, lo_open=True), metadata={
        "help": "learning rate of the unlearning (SGD, momentum 0.9, cosine)"})
    flood_level: float = attrs.field(default=0.5, validator=in_range(0, None), metadata={
        "help": "flooding level b of the unlearning loss |CE - b| + b"})
    batch_size: int = attrs.field(default=128, validator=in_range(1, None))


class ScanFT(Defense):
    name = "scanft"
    Config = ScanFTConfig
    clean_data = "required"
    summary = "SCAnFT: SCAn detection against trusted clean data, then flooded unlearning of the flagged (needs [clean])"

    @classmethod
    def check_components(cls, config, registry):
        from bdframe.recipe import table_problems

        return table_problems(registry, "scorer", "scan", "scan", dict(config.scan))

    def run(self, data, ctx):
        """The model, SCAn with the clean data as reference, unlearning; see the module text."""
        from bdframe.interfaces import ScoreContext
        from bdframe.seeding import derive_seed

        c = self.config
        clean = steps.clean_data(ctx, "scanft")
        model, start = steps.starting_model(ctx, "scanft-train", data, path=c.model)
        scorer = ctx.component("scorer", "scan", **c.scan)
        cp = ctx.checkpoint("scanft-detect")
        found = cp.load()
        if found is None:
            sctx = ScoreContext(seed=derive_seed(ctx.seed, "scanft", "scan"), device=ctx.device, batch_size=256,
                                progress=ctx.progress)
            scores = scorer.score(model, data, sctx, aux=clean).double().cpu()
            flagged = scorer.flag(scores, data)
            found = {"scores": scores, "flagged": data.ids[flagged].clone()}
            ctx.log({"stage": "scanft-detect", "flagged": int(flagged.sum())})
            cp.save(found)
        forget = data.subset(data.contains(found["flagged"]))
        unlearn = ctx.component("trainer", "unlearning", objective="flooding", flood_level=c.flood_level,
                                epochs=c.epochs, lr=c.lr, batch_size=c.batch_size)
        if len(forget):
            done = steps.train(ctx, "scanft-unlearn", model, unlearn, data.subset(data.ids[:0]), forget=forget,
                               lr_setting="[defense] lr")
        else:
            done = {"eval": start["eval"], "seconds": 0.0}
        summary = [steps.start_line("scanft", c.model, start["eval"]),
                   f"scanft: SCAn flagged {len(forget)} of {len(data)} samples with {len(clean)} clean images as reference",
                   f"scanft: after {c.epochs if len(forget) else 0} epochs of unlearning them: {steps.figures(done['eval'])}"]
        metrics = {"clean_images": len(clean), "flagged": len(forget),
                   "trend": [{"step": "start", **start["eval"]}, {"step": "unlearned", **done["eval"]}],
                   "stage_seconds": {"train": start["seconds"], "unlearn": done["seconds"]}}
        return DefenseResult(model=model, suspected_ids=found["flagged"].clone(), scores=found["scores"],
                             metrics=metrics, summary=summary)


@hookimpl
def bdframe_register_defenses(registry):
    registry.add(ScanFT)
