"""strip (docs/scorers.md): entropy range, constant model, fixed overlay pool."""

import math

import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from bdframe.testing import score_ctx, tiny_imageset
from bdframe_scorer_strip.plugin import Strip, StripConfig
from scorers.scorer_helpers import make


@settings(max_examples=6, deadline=None)
@given(st.integers(1, 12), st.floats(0, 1.5), st.integers(0, 100))
def test_entropy_in_range(n_overlays, alpha, seed):
    data, model = make(16, seed=seed)
    h = Strip(StripConfig(n_overlays=n_overlays, alpha=alpha)).entropy(model, data, score_ctx(seed))
    assert bool((h >= 0).all() and (h <= math.log(4) + 1e-12).all())


def test_constant_model_gives_its_entropy():
    data, model = make(12, constant=True)
    with torch.no_grad():
        p = F.softmax(model(torch.zeros(1, 3, 8, 8)).double(), 1)[0]
    h_const = float(-(p * p.log()).sum())
    s = Strip(StripConfig(n_overlays=5)).score(model, data, score_ctx(0))
    assert torch.allclose(s, torch.full((12,), -h_const, dtype=torch.float64), atol=1e-9)


def test_pool_is_fixed_and_aux_makes_scores_fully_per_sample():
    data, model = make(30)
    sc = Strip(StripConfig(n_overlays=6))
    pool = sc.reference_ids(data, score_ctx(0))
    perm = torch.randperm(30)
    assert set(sc.reference_ids(data.subset(perm), score_ctx(0)).tolist()) == set(pool.tolist())
    aux = tiny_imageset(20, num_classes=4, size=8, seed=9, id_offset=5000)
    full = sc.score(model, data, score_ctx(0), aux=aux)
    part = torch.arange(0, 30, 4)
    assert torch.allclose(sc.score(model, data.subset(part), score_ctx(0), aux=aux), full[part], atol=1e-9)
    assert not torch.allclose(full, sc.score(model, data, score_ctx(0)))  # a different pool


def test_flag_is_low_entropy_quantile():
    sc = Strip(StripConfig(fpr=0.1))
    s = -torch.arange(100, dtype=torch.float64)  # entropies 0..99
    f = sc.flag(s)
    assert f[:10].all() and not f[11:].any()
