"""``spectral``: Spectral Signatures (Tran et al. 2018; see docs/scorers.md, spectral).

Per class c: take the penultimate features R_c of the class's samples, centre them, and let v be
the top right singular vector of the centred matrix; the score is ``<r_i - mean_c, v>^2`` (>= 0,
invariant to the sign of v and to shifting a class's features; a class's scores depend only on
that class). ``projection = "backdoorbench"`` reproduces BackdoorBench's variant instead
(``|<r_i, v>|`` on the uncentred features). Set-level: a sample's score depends on its class.

Split rule (:meth:`Spectral.flag`), per class:

- ``rule = "bound"`` (default; backdoor-toolbox with the paper's 1.5 factor): remove the top
  ``min(floor(1.5 * poison_rate_bound * N), floor(n_c / 2))`` scores, N = the set size. The
  references set the bound to the true poison rate (an oracle); here it is a user parameter.
- ``rule = "percentile"`` (BackdoorBench): remove the scores above the ``percentile``-th
  percentile of the class (15% of every class by default).

Ties at a class's cut are broken by id. Computed in float64 on the CPU.
"""

from __future__ import annotations

import attrs

from bdframe import hookimpl
from bdframe.config import in_range, one_of
from bdframe.interfaces import SampleScorer


@attrs.frozen
class SpectralConfig:
    projection: str = attrs.field(default="paper", validator=one_of("paper", "backdoorbench"),
                                  metadata={"help": "paper: <r - mean, v>^2; backdoorbench: |<r, v>|"})
    rule: str = attrs.field(default="bound", validator=one_of("bound", "percentile"),
                            metadata={"help": "split: per-class count from a poison-rate bound, or a percentile"})
    poison_rate_bound: float = attrs.field(default=0.05, validator=in_range(0, 1),
                                           metadata={"help": "split (bound): assumed upper bound on the poison rate"})
    factor: float = attrs.field(default=1.5, validator=in_range(0, None),
                                metadata={"help": "split (bound): removal factor on the bound"})
    percentile: float = attrs.field(default=85.0, validator=in_range(0, 100),
                                    metadata={"help": "split (percentile): flag scores above this class percentile"})


def _class_rows(labels):
    import torch

    for c in torch.unique(labels).tolist():
        yield c, torch.nonzero(labels == c).flatten()


class Spectral(SampleScorer):
    name = "spectral"
    Config = SpectralConfig
    summary = "Spectral Signatures: squared projection on each class's top singular direction"
    set_level = True

    def scores_from_features(self, feats, labels):
        """Scores for a ``(N, D)`` feature matrix and its labels (float64)."""
        import torch

        feats = feats.to(torch.float64)
        out = torch.zeros(len(feats), dtype=torch.float64)
        for _, rows in _class_rows(labels):
            r = feats[rows]
            if len(rows) < 2:
                continue
            centred = r - r.mean(0, keepdim=True)
            if not bool(centred.abs().max() > 0):
                continue
            _, _, vh = torch.linalg.svd(centred, full_matrices=False)
            v = vh[0]
            if self.config.projection == "paper":
                out[rows] = (centred @ v) ** 2
            else:
                out[rows] = (r @ v).abs()
        return out

    def score(self, model, data, ctx):
        from bdframe.scoring import features

        return self.scores_from_features(features(model, data, ctx, "spectral"), data.labels)

    def flag(self, scores, data):
        import torch

        n = len(scores)
        flagged = torch.zeros(n, dtype=torch.bool)
        for _, rows in _class_rows(data.labels):
            nc = len(rows)
            s = scores[rows]
            if self.config.rule == "bound":
                k = min(int(self.config.factor * self.config.poison_rate_bound * n), nc // 2)
                if k <= 0:
                    continue
                by_id = torch.argsort(data.ids[rows])
                order = by_id[torch.argsort(s[by_id], descending=True, stable=True)]
                flagged[rows[order[:k]]] = True
            else:
                q = torch.quantile(s.double(), self.config.percentile / 100.0)
                flagged[rows[s.double() > q]] = True
        return flagged


@hookimpl
def bdframe_register_scorers(registry):
    registry.add(Spectral)
