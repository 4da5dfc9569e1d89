"""sce (DBD's label-credibility score, docs/scorers.md)."""

import math

import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from bdframe.testing import score_ctx
from bdframe_scorer_sce.plugin import Sce, SceConfig
from scorers.scorer_helpers import make


@settings(max_examples=8, deadline=None)
@given(st.integers(2, 60), st.integers(0, 100), st.floats(0, 1), st.floats(0, 2))
def test_score_is_alpha_ce_plus_beta_bounded_reverse_ce(n, seed, alpha, beta):
    data, model = make(n, seed=seed)
    s = Sce(SceConfig(alpha=alpha, beta=beta)).score(model, data, score_ctx(seed))
    with torch.no_grad():
        z = model(data.images.float() / 255).double()
    ce = F.cross_entropy(z, data.labels, reduction="none")
    p_y = z.softmax(1).gather(1, data.labels[:, None])[:, 0]
    ref = alpha * ce + beta * -math.log(1e-4) * (1 - p_y)
    assert bool((s >= 0).all()) and torch.allclose(s, ref, atol=1e-4)


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 300), st.floats(0, 1))
def test_flags_all_but_the_credible_share(n, share):
    data, _ = make(n)
    scores = torch.rand(n, dtype=torch.float64)
    f = Sce(SceConfig(credible_share=share)).flag(scores, data)
    assert int((~f).sum()) == math.floor(share * n + 1e-9)
    if f.any() and (~f).any():
        assert float(scores[f].min()) >= float(scores[~f].max())


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 300), st.floats(0, 1), st.integers(0, 100))
def test_split_by_class_flags_all_but_the_credible_share_of_every_label(n, share, seed):
    data, _ = make(n, seed=seed)
    scores = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    f = Sce(SceConfig(credible_share=share, split_by="class")).flag(scores, data)
    for c in torch.unique(data.labels):
        rows = data.labels == c
        assert int((rows & ~f).sum()) == math.floor(share * int(rows.sum()) + 1e-9)
        if (rows & f).any() and (rows & ~f).any():
            assert float(scores[rows & f].min()) >= float(scores[rows & ~f].max())
