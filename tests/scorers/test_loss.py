"""loss (ABL isolation score, docs/scorers.md)."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from bdframe.testing import score_ctx
from bdframe_scorer_loss.plugin import Loss, LossConfig
from scorers.scorer_helpers import make


@settings(max_examples=8, deadline=None)
@given(st.integers(2, 60), st.integers(0, 100))
def test_score_is_log_prob_of_label(n, seed):
    data, model = make(n, seed=seed)
    s = Loss().score(model, data, score_ctx(seed))
    with torch.no_grad():
        ref = F.log_softmax(model(data.images.float() / 255).double(), 1).gather(1, data.labels[:, None])[:, 0]
    assert bool((s <= 0).all()) and torch.allclose(s.double(), ref, atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 500), st.floats(0, 0.3))
def test_isolation_size(n, ratio):
    data, _ = make(n)
    scores = -torch.rand(n)
    f = Loss(LossConfig(isolation_ratio=ratio)).flag(scores, data)
    assert int(f.sum()) == int(ratio * n)
    if f.any() and (~f).any():
        assert float(scores[f].min()) >= float(scores[~f].max())
