"""activation-clustering (docs/scorers.md): planted cluster, size rule, equivariance."""

import torch
from hypothesis import given, settings, strategies as st

from bdframe.testing import score_ctx
from bdframe_scorer_activation_clustering.plugin import ActivationClustering, ActivationClusteringConfig
from scorers.scorer_helpers import make


def planted(n=120, d=20, k=3, n_poison=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.arange(n) % k
    poison = torch.zeros(n, dtype=torch.bool)
    poison[torch.nonzero(y == 1).flatten()[:n_poison]] = True
    x[poison] += 6.0 * torch.randn(d, generator=g, dtype=torch.float64)
    return x, y, torch.arange(n) + 1000, poison


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 1000), st.sampled_from(["relative-size", "smaller", "silhouette"]))
def test_planted_cluster_is_flagged_and_equivariant(seed, decision):
    x, y, ids, poison = planted(seed=seed)
    sc = ActivationClustering(ActivationClusteringConfig(decision=decision))
    s, f = sc.scores_from_features(x, y, ids, seed)
    assert torch.equal(f[poison], torch.ones(int(poison.sum()), dtype=torch.bool))
    assert torch.equal(sc.flag(s), f) and bool((s >= 0).all() and (s < 2).all())
    if decision == "relative-size":
        for c in range(3):
            assert int(f[y == c].sum()) < 0.35 * int((y == c).sum())
        assert torch.equal(f[y == 1], poison[y == 1])  # the planted class: exactly the planted cluster
    perm = torch.randperm(len(x))
    s2, f2 = sc.scores_from_features(x[perm], y[perm], ids[perm], seed)
    assert torch.equal(f2, f[perm]) and torch.allclose(s2, s[perm], atol=1e-9)
    s3, _ = sc.scores_from_features(x, y, ids, seed)
    assert torch.equal(s3, s)


def test_binary_mode_and_constant_model():
    x, y, ids, poison = planted()
    sc = ActivationClustering(ActivationClusteringConfig(graded=False))
    s, f = sc.scores_from_features(x, y, ids, 0)
    assert set(s.unique().tolist()) <= {0.0, 1.0} and torch.equal(s == 1, f)
    data, model = make(20, constant=True)
    assert torch.equal(ActivationClustering().score(model, data, score_ctx(0)), torch.zeros(20, dtype=torch.float64))
