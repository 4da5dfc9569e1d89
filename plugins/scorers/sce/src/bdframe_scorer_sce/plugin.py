"""``sce``: DBD's label-credibility score (Huang et al. 2022; see docs/scorers.md, sce).

``s_i = alpha * CE(f(x_i), y_i) + beta * RCE(f(x_i), y_i)``, the symmetric cross-entropy of a
sample under its given label (eval mode, no augmentation; the reverse term is
``9.21 * (1 - p_y)``), so ``s >= 0``. On a model whose features were learned without the labels
(DBD's self-supervised backbone and linear probe) a poisoned sample's label disagrees with its
content and its loss is high: higher = more likely poisoned. A sample's score does not depend on
the others. Split rule (:meth:`Sce.flag`): all but the ``floor(credible_share * N)`` lowest-loss
samples (ties broken by id) are flagged, DBD's low-credible set; with ``split_by = "class"`` the
share is taken within each given label.
"""

from __future__ import annotations

import attrs

from bdframe import hookimpl
from bdframe.config import in_range, one_of
from bdframe.interfaces import SampleScorer


@attrs.frozen
class SceConfig:
    alpha: float = attrs.field(default=0.1, validator=in_range(0, None), metadata={"help": "weight of CE"})
    beta: float = attrs.field(default=1.0, validator=in_range(0, None), metadata={"help": "weight of the reverse CE"})
    credible_share: float = attrs.field(default=0.5, validator=in_range(0, 1), metadata={
        "help": "split: share of samples whose labels are kept (lowest loss); the rest are flagged"})
    split_by: str = attrs.field(default="all", validator=one_of("all", "class"), metadata={
        "help": "split: \"all\": the lowest share of the whole set; \"class\": the lowest share within each given label"})


class Sce(SampleScorer):
    name = "sce"
    Config = SceConfig
    summary = "DBD symmetric cross-entropy under the given label (high = low-credible label)"
    set_level = False

    def score(self, model, data, ctx):
        from bdframe.scoring import sce_losses

        c = self.config
        return sce_losses(model, data, ctx, alpha=c.alpha, beta=c.beta).double()

    def flag(self, scores, data):
        """Every sample outside the ``floor(credible_share * N)`` lowest scores (ties by id), or
        outside the lowest share of its own label with ``split_by = "class"``."""
        from bdframe.losses import lowest_share

        c = self.config
        return ~lowest_share(scores, c.credible_share, data.ids, data.labels if c.split_by == "class" else None)


@hookimpl
def bdframe_register_scorers(registry):
    registry.add(Sce)
