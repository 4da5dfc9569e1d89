"""scale-up (SPC, docs/scorers.md)."""

import torch
from hypothesis import given, settings, strategies as st

from bdframe.testing import score_ctx
from bdframe_scorer_scale_up.plugin import ScaleUp, ScaleUpConfig
from scorers.scorer_helpers import make


@settings(max_examples=8, deadline=None)
@given(st.lists(st.floats(0.5, 12), min_size=1, max_size=5), st.integers(0, 100))
def test_spc_takes_values_k_over_s(scales, seed):
    data, model = make(20, seed=seed)
    s = ScaleUp(ScaleUpConfig(scales=tuple(scales))).score(model, data, score_ctx(seed))
    k = s * len(scales)
    assert bool((s >= 0).all() and (s <= 1).all()) and torch.allclose(k, k.round(), atol=1e-5)


def test_unit_scale_and_constant_model_give_one():
    data, model = make(20)
    assert torch.equal(ScaleUp(ScaleUpConfig(scales=(1.0,))).score(model, data, score_ctx(0)), torch.ones(20))
    _, const = make(20, constant=True)
    assert torch.equal(ScaleUp().score(const, data, score_ctx(0)), torch.ones(20))


def test_flag_threshold():
    sc = ScaleUp()
    assert sc.flag(torch.tensor([0.0, 0.4, 0.6, 1.0])).tolist() == [False, False, True, True]
