"""``strip``: STRIP superimposition entropy (Gao et al. 2019; see docs/scorers.md, strip).

Each inspected image is superimposed with every image of a fixed overlay pool,
``x + alpha * x_j`` (no clipping, the reference form), and the prediction entropies are
averaged: ``H = mean_j H(p(x + alpha x_j))``. A trigger dominates the blend and keeps the
prediction confident, so the score is ``-H`` (higher = more likely poisoned); ``H`` lies in
``[0, log K]`` (computed from log-softmax in float64, clamped).

Overlay pool (the paper's trusted clean set). STRIP assumes a small clean set. Without one, the
pool is an approximation: ``n_overlays`` images drawn uniformly from the *inspected* set by
per-id hash keys (seeded), so the same images are chosen whatever the row order and batch
size. The pool may contain poisoned images at the set's poison rate. Given a trusted set,
pass it as ``score(..., aux=clean_set)`` and the pool is drawn from it instead. The pool is
drawn once and shared by all samples, so a sample's score depends only on the sample and the
pool (:meth:`Strip.reference_ids` names the pool rows taken from the inspected set).

Split rule (:meth:`Strip.flag`): flag entropies at or below the ``fpr`` quantile of the
inspected set's entropies (the reference takes the quantile over a clean set; here the
inspected set, mostly clean, stands in for it).

Defaults are backdoor-toolbox's training-set cleanser: alpha = 1.0, N = 100, FPR = 0.1
(BackdoorBench's class defaults are alpha = 0.5, N = 64, FPR = 0.05).
"""

from __future__ import annotations

import attrs

from bdframe import hookimpl
from bdframe.config import in_range
from bdframe.interfaces import SampleScorer


@attrs.frozen
class StripConfig:
    n_overlays: int = attrs.field(default=100, validator=in_range(1, None),
                                  metadata={"help": "number of overlay images N"})
    alpha: float = attrs.field(default=1.0, validator=in_range(0, None),
                               metadata={"help": "overlay weight: x + alpha * x_j"})
    fpr: float = attrs.field(default=0.1, validator=in_range(0, 1),
                             metadata={"help": "split: flag entropies below this quantile"})


class Strip(SampleScorer):
    name = "strip"
    Config = StripConfig
    summary = "STRIP: -entropy of predictions on superimposed images (overlay pool from the data)"
    set_level = False

    def _pool_rows(self, source, seed: int):
        from bdframe.scoring import order_by_key

        return order_by_key(("strip", int(seed), "pool"), source.ids)[: self.config.n_overlays]

    def reference_ids(self, data, ctx):
        """Ids of the inspected rows used as overlays (when no ``aux`` set is given)."""
        return data.ids[self._pool_rows(data, ctx.seed)]

    def entropy(self, model, data, ctx, *, aux=None):
        """Mean prediction entropy over the overlays, float64 in [0, log K]."""
        import math

        import torch
        import torch.nn.functional as F

        from bdframe.data import to_float
        from bdframe.scoring import batches, eval_mode

        source = aux if aux is not None else data
        if len(source) == 0:
            from bdframe.errors import UserError

            raise UserError("strip: the overlay pool is empty")
        pool = source.subset(self._pool_rows(source, ctx.seed))
        overlays = to_float(pool.images).to(ctx.device) * self.config.alpha
        out = []
        with eval_mode(model), torch.no_grad():
            for x, _, _ in batches(data, ctx, "strip"):
                h = torch.zeros(len(x), dtype=torch.float64, device=x.device)
                k = 1
                for o in overlays:
                    logp = F.log_softmax(model(x + o).double(), 1)
                    k = logp.shape[1]
                    h -= (logp.exp() * logp).sum(1)
                out.append((h / len(overlays)).clamp(0, math.log(k)).cpu())
        return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)

    def score(self, model, data, ctx, *, aux=None):
        return -self.entropy(model, data, ctx, aux=aux)

    def flag(self, scores, data=None):
        import torch

        if len(scores) == 0:
            return torch.zeros(0, dtype=torch.bool)
        h = -scores.double()
        return h <= torch.quantile(h, self.config.fpr)


@hookimpl
def bdframe_register_scorers(registry):
    registry.add(Strip)
