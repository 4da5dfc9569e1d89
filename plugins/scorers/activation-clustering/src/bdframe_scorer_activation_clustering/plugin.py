"""``activation-clustering``: Activation Clustering (Chen et al. 2018; see docs/scorers.md).

Per class: the penultimate features are centred and projected onto their top ``n_components``
(10) principal directions (PCA as in BackdoorBench; the backdoor-toolbox projection onto the
top-10 right singular vectors of the centred features is the same thing; the paper's ICA is not
offered), then split by 2-means. One cluster may be declared poisoned:

- ``decision = "relative-size"`` (default, backdoor-toolbox): the smaller cluster, if it holds fewer
  than ``size_threshold`` (0.35) of the class;
- ``"smaller"``: the smaller cluster, always (every class loses data; equal sizes flag nothing);
- ``"silhouette"``: the smaller cluster, if the 2-means silhouette score exceeds
  ``silhouette_threshold`` (0.15, backdoor-toolbox's CIFAR-10 value).

Score. The paper's score is the 0/1 membership. With ``graded = true`` (default) the score is
``membership + d / (1 + d)``, where ``d`` is the sample's distance to the larger cluster's
centroid divided by the class's median such distance: every flagged sample still scores >= 1 and
every other < 1, so the split rule (:meth:`ActivationClustering.flag`: score >= 1) is unchanged,
while the AUROC gets a ranking inside both groups. ``graded = false`` gives plain 0/1.

k-means (bdframe's choice, ``bdframe.scoring.two_means``): ``n_init`` restarts of k-means++ seeding and Lloyd iterations, the lowest inertia
wins. Every random choice is keyed by (seed, class, restart, sample id), using weighted
sampling by hash keys (Efraimidis-Spirakis), so the clustering does not depend on the row
order: the scorer is permutation-equivariant. Set-level: a score depends on the sample's class.
"""

from __future__ import annotations

import attrs

from bdframe import hookimpl
from bdframe.config import in_range, one_of
from bdframe.interfaces import SampleScorer


@attrs.frozen
class ActivationClusteringConfig:
    n_components: int = attrs.field(default=10, validator=in_range(1, None),
                                     metadata={"help": "PCA dimensions before clustering"})
    decision: str = attrs.field(default="relative-size", validator=one_of("relative-size", "smaller", "silhouette"),
                                metadata={"help": "which cluster (if any) is poisoned"})
    size_threshold: float = attrs.field(default=0.35, validator=in_range(0, 1),
                                        metadata={"help": "relative-size: flag the smaller cluster below this share"})
    silhouette_threshold: float = attrs.field(default=0.15, validator=in_range(-1, 1),
                                              metadata={"help": "silhouette: flag when the score exceeds this"})
    graded: bool = attrs.field(default=True,
                               metadata={"help": "add a distance-based tie-break in [0,1) to the 0/1 membership"})
    n_init: int = attrs.field(default=10, validator=in_range(1, None))
    max_iter: int = attrs.field(default=300, validator=in_range(1, None))


def _silhouette(z, assign, chunk: int = 2048) -> float:
    """Mean silhouette of a 2-cluster assignment (0 for singleton clusters)."""
    import torch

    n = len(z)
    counts = torch.bincount(assign, minlength=2).to(z.dtype)
    if bool((counts == 0).any()):
        return 0.0
    sums = torch.zeros(n, 2, dtype=z.dtype)
    onehot = torch.nn.functional.one_hot(assign, 2).to(z.dtype)
    for i in range(0, n, chunk):
        d = torch.cdist(z[i:i + chunk], z)
        sums[i:i + chunk] = d @ onehot
    own = assign
    n_own = counts[own]
    a = sums.gather(1, own[:, None])[:, 0] / (n_own - 1).clamp(min=1)
    b = sums.gather(1, (1 - own)[:, None])[:, 0] / counts[1 - own]
    s = torch.where(n_own > 1, (b - a) / torch.maximum(a, b).clamp(min=1e-300), torch.zeros_like(a))
    return float(s.mean())


class ActivationClustering(SampleScorer):
    name = "activation-clustering"
    Config = ActivationClusteringConfig
    summary = "Activation Clustering: per-class 2-means on PCA-reduced features"
    set_level = True

    def scores_from_features(self, feats, labels, ids, seed: int):
        """``(scores, flagged)`` for a feature matrix (float64 scores, bool flags)."""
        import torch

        from bdframe.scoring import pca_project, two_means

        c = self.config
        feats = feats.to(torch.float64)
        n = len(feats)
        scores = torch.zeros(n, dtype=torch.float64)
        flagged = torch.zeros(n, dtype=torch.bool)
        for cls in torch.unique(labels).tolist():
            rows = torch.nonzero(labels == cls).flatten()
            if len(rows) < 2:
                continue
            z = pca_project(feats[rows], c.n_components)
            if z is None:
                continue
            assign, centres = two_means(z, ids[rows], ("activation-clustering", int(seed), int(cls)),
                                        n_init=c.n_init, max_iter=c.max_iter)
            sizes = torch.bincount(assign, minlength=2)
            small = int(torch.argmin(sizes))
            large = 1 - small
            nc = len(rows)
            if sizes[0] == sizes[1] or sizes[small] == 0:
                poison = False
            elif c.decision == "smaller":
                poison = True
            elif c.decision == "relative-size":
                poison = bool(sizes[small] < c.size_threshold * nc)
            else:
                poison = _silhouette(z, assign) > c.silhouette_threshold
            member = (assign == small) & poison
            flagged[rows] = member
            s = member.to(torch.float64)
            if c.graded:
                d = (z - centres[large]).norm(dim=1)
                scale = d.median()
                if not bool(scale > 0):
                    scale = d.mean()
                if bool(scale > 0):
                    d = d / scale
                    s = s + d / (1 + d)
            scores[rows] = s
        return scores, flagged

    def score(self, model, data, ctx):
        from bdframe.scoring import features

        feats = features(model, data, ctx, "activation-clustering")
        return self.scores_from_features(feats, data.labels, data.ids, ctx.seed)[0]

    def flag(self, scores, data=None):
        if self.config.graded:
            return scores >= 1.0
        return scores >= 0.5


@hookimpl
def bdframe_register_scorers(registry):
    registry.add(ActivationClustering)
