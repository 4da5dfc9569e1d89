"""spectral (docs/scorers.md): s >= 0, invariances, class independence, split sizes."""

import torch
from hypothesis import given, settings, strategies as st

from bdframe.testing import score_ctx, tiny_imageset
from bdframe_scorer_spectral.plugin import Spectral, SpectralConfig
from scorers.scorer_helpers import make

SET = settings(max_examples=10, deadline=None)


def feats(n, d, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.arange(n) % k


@SET
@given(st.integers(2, 60), st.integers(1, 12), st.integers(1, 4), st.integers(0, 1000))
def test_nonnegative_and_invariances(n, d, k, seed):
    x, y = feats(n, d, k, seed)
    sc = Spectral()
    s = sc.scores_from_features(x, y)
    assert bool((s >= 0).all())
    shift = torch.randn(k, d, dtype=torch.float64)[y]  # a constant vector per class
    assert torch.allclose(sc.scores_from_features(x + shift, y), s, atol=1e-8, rtol=1e-6)
    perm = torch.randperm(n)
    assert torch.allclose(sc.scores_from_features(x[perm], y[perm]), s[perm], atol=1e-8, rtol=1e-6)
    # class 0's scores depend only on class 0
    other = y != 0
    x2 = x.clone()
    x2[other] = torch.randn(int(other.sum()), d, dtype=torch.float64)
    assert torch.allclose(sc.scores_from_features(x2, y)[~other], s[~other], atol=1e-8, rtol=1e-6)


def test_planted_direction_scores_highest():
    x, y = feats(200, 16, 2, 0)
    poison = torch.zeros(200, dtype=torch.bool)
    poison[torch.arange(0, 200, 2)[:15]] = True  # 15 samples of class 0, shifted along one direction
    x[poison, 3] += 8.0
    s = Spectral().scores_from_features(x, y)
    assert set(torch.topk(s, 15).indices.tolist()) == set(torch.nonzero(poison).flatten().tolist())


@SET
@given(st.integers(4, 300), st.floats(0, 0.5), st.integers(1, 5))
def test_bound_split_sizes(n, rate, k):
    data = tiny_imageset(n, num_classes=k, size=4)
    sc = Spectral(SpectralConfig(poison_rate_bound=rate))
    s = torch.rand(n, dtype=torch.float64)
    f = sc.flag(s, data)
    for c in range(k):
        nc = int((data.labels == c).sum())
        assert int(f[data.labels == c].sum()) == min(int(1.5 * rate * n), nc // 2)
    pct = Spectral(SpectralConfig(rule="percentile")).flag(s, data)
    for c in range(k):
        sel = data.labels == c
        assert int(pct[sel].sum()) <= int(0.15 * int(sel.sum())) + 1


def test_constant_model_gives_zeros():
    data, model = make(20, constant=True)
    assert torch.equal(Spectral().score(model, data, score_ctx(0)), torch.zeros(20, dtype=torch.float64))
