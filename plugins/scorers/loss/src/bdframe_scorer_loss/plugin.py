"""``loss``: ABL's isolation score (Li et al. 2021; see docs/scorers.md, loss).

``s_i = -CE(f(x_i), y_i) = log p_{y_i}(x_i)`` (<= 0), computed in eval mode without
augmentation: a backdoor is learned faster than clean features, so poisoned samples have the
lowest loss. Split rule (:meth:`Loss.flag`): the ``floor(isolation_ratio * N)`` lowest-loss
samples are isolated (ABL's ``isolation_ratio = 0.01``; ties at the boundary are broken by id).
"""

from __future__ import annotations

import attrs

from bdframe import hookimpl
from bdframe.config import in_range
from bdframe.interfaces import SampleScorer


@attrs.frozen
class LossConfig:
    isolation_ratio: float = attrs.field(default=0.01, validator=in_range(0, 1),
                                         metadata={"help": "split: fraction isolated as poisoned (lowest loss)"})


class Loss(SampleScorer):
    name = "loss"
    Config = LossConfig
    summary = "ABL loss score: log p_y(x) = -CE (low loss = likely poisoned)"
    set_level = False

    def score(self, model, data, ctx):
        import torch
        import torch.nn.functional as F

        from bdframe.scoring import batches, eval_mode

        out = []
        with eval_mode(model), torch.no_grad():
            for x, y, _ in batches(data, ctx, "loss"):
                logp = F.log_softmax(model(x).double(), 1)
                out.append(logp.gather(1, y[:, None])[:, 0].clamp(max=0).float().cpu())
        return torch.cat(out) if out else torch.empty(0)

    def flag(self, scores, data):
        """The ``floor(isolation_ratio * N)`` highest scores (lowest losses); ties broken by id."""
        import torch

        n = len(scores)
        k = int(self.config.isolation_ratio * n)
        flagged = torch.zeros(n, dtype=torch.bool)
        if k:
            by_id = torch.argsort(data.ids)
            order = by_id[torch.argsort(scores[by_id], descending=True, stable=True)]
            flagged[order[:k]] = True
        return flagged


@hookimpl
def bdframe_register_scorers(registry):
    registry.add(Loss)
