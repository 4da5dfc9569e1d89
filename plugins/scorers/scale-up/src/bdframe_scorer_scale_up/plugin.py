"""``scale-up``: SCALE-UP scaled prediction consistency (Guo et al. 2023; docs/scorers.md).

``SPC(x) = mean_{n in S} 1[argmax f(clip01(n * x)) == argmax f(x)]`` with ``S = {3, 5, 7, 9, 11}``;
the scaling happens in [0,1] pixel space (the model wrapper normalises afterwards). Poisoned
inputs keep their (target) prediction under amplification, so higher = more likely poisoned.
Label-free and black-box: only predictions are used, never the labels.

Split rule (:meth:`ScaleUp.flag`): ``SPC >= threshold`` (0.5). The data-limited variant of the
paper (standardising SPC by benign statistics) is not offered: with global statistics it is an
affine, monotone map, so rankings and the AUROC are unchanged.
"""

from __future__ import annotations

import attrs

from bdframe import hookimpl
from bdframe.config import each, in_range
from bdframe.interfaces import SampleScorer


@attrs.frozen
class ScaleUpConfig:
    scales: tuple[float, ...] = attrs.field(default=(3.0, 5.0, 7.0, 9.0, 11.0),
                                            validator=each(in_range(0, None, lo_open=True)),
                                            metadata={"help": "pixel amplification factors S"})
    threshold: float = attrs.field(default=0.5, validator=in_range(0, 1),
                                   metadata={"help": "split: flag SPC >= threshold"})

    def check(self):
        return [] if self.scales else [("scales", "must not be empty")]


class ScaleUp(SampleScorer):
    name = "scale-up"
    Config = ScaleUpConfig
    summary = "SCALE-UP: fraction of pixel amplifications that keep the prediction (SPC in [0,1])"
    set_level = False

    def score(self, model, data, ctx):
        import torch

        from bdframe.scoring import batches, eval_mode

        out = []
        scales = self.config.scales
        with eval_mode(model), torch.no_grad():
            for x, _, _ in batches(data, ctx, "scale-up"):
                pred = model(x).argmax(1)
                agree = torch.zeros(len(x), device=x.device)
                for s in scales:
                    if s == 1:
                        agree += 1
                    else:
                        agree += (model((x * s).clamp(0, 1)).argmax(1) == pred).float()
                out.append((agree / len(scales)).cpu())
        return torch.cat(out) if out else torch.empty(0)

    def flag(self, scores, data=None):
        return scores >= self.config.threshold - 1e-9


@hookimpl
def bdframe_register_scorers(registry):
    registry.add(ScaleUp)
