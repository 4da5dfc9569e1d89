"""fct (docs/scorers.md): ranges, identity, split sizes, per-id transformations."""

import math

import torch
from hypothesis import given, settings, strategies as st

from bdframe.testing import score_ctx
from bdframe_scorer_fct.plugin import TRANSFORMS, Fct, FctConfig
from scorers.scorer_helpers import make

SET = settings(max_examples=8, deadline=None)


@SET
@given(st.lists(st.sampled_from(TRANSFORMS), max_size=3), st.sampled_from(["mse", "cosine"]),
       st.integers(0, 10 ** 6))
def test_range_and_transform_shape(transforms, metric, seed):
    data, model = make(12, seed=seed % 5)
    sc = Fct(FctConfig(transforms=tuple(transforms), metric=metric))
    s = sc.score(model, data, score_ctx(seed))
    assert bool((s >= 0).all()) and bool(torch.isfinite(s).all())
    if metric == "cosine":
        assert bool((s <= 2).all())
    x = data.images.float() / 255
    y = sc.transform(x, data.ids, seed)
    assert y.shape == x.shape and bool((y >= -1e-6).all() and (y <= 1 + 1e-6).all())
    # per-id randomness: transforming a subset gives the same rows
    assert torch.allclose(sc.transform(x[3:7], data.ids[3:7], seed), y[3:7], atol=1e-6)


def test_identity_gives_zero():
    data, model = make(10)
    assert torch.equal(Fct(FctConfig(transforms=())).score(model, data, score_ctx(0)), torch.zeros(10))
    # rotation by 0 degrees and a zero shift reproduce the image exactly (sampling is pixel-aligned)
    sc = Fct(FctConfig(rotate_degrees=0.0, translate=0.0))
    x = data.images.float() / 255
    assert torch.equal(sc.transform(x, data.ids, 0), x)
    assert torch.equal(sc.score(model, data, score_ctx(0)), torch.zeros(10))


def test_rotation_and_translation_geometry():
    from bdframe.scoring import id_uniform

    data, _ = make(4, size=8)
    x = data.images.float()[:1] / 255
    ids = torch.arange(20000)
    # an id whose random angle is within 0.1 degree of +-180: the rotation is a double flip
    u = id_uniform(("fct", 0, 0, "rotate"), ids, 4)[:, 0]
    i = int(torch.argmin(((2 * u - 1) * 180).abs().sub(180).abs()))
    rot = Fct(FctConfig(transforms=("rotate",)))
    assert torch.equal(rot.transform(x, ids[i:i + 1], 0), x.flip(2).flip(3))
    # translation: whole-pixel shift with zero fill
    aff = Fct(FctConfig(transforms=("affine",), translate=0.25))
    u = id_uniform(("fct", 0, 0, "affine"), ids[:50], 4)
    for j in range(50):
        tx = round((2 * float(u[j, 0]) - 1) * 0.25 * 8)
        ty = round((2 * float(u[j, 1]) - 1) * 0.25 * 8)
        ref = torch.zeros_like(x)
        src = x[..., max(0, -ty):8 - max(0, ty), max(0, -tx):8 - max(0, tx)]
        ref[..., max(0, ty):8 - max(0, -ty), max(0, tx):8 - max(0, -tx)] = src
        assert torch.equal(aff.transform(x, ids[j:j + 1], 0), ref), (tx, ty)


def test_constant_model_gives_zero():
    data, model = make(10, constant=True)
    assert torch.equal(Fct(FctConfig()).score(model, data, score_ctx(0)), torch.zeros(10))


@SET
@given(st.integers(1, 200), st.floats(0, 0.5), st.floats(0, 0.5))
def test_partition_sizes_and_cover(n, ac, ap):
    sc = Fct(FctConfig(alpha_clean=ac, alpha_poison=ap))
    scores = torch.randperm(n).float()  # distinct scores: sizes are exact
    clean, unc, poison = sc.partition(scores)
    assert int(poison.sum()) == int(ap * n)
    assert int(clean.sum()) == min(int(ac * n) + 1, n - int(ap * n))
    assert bool((clean.int() + unc.int() + poison.int() == 1).all())
    assert torch.equal(sc.flag(scores), poison)
    if poison.any() and clean.any():
        assert float(scores[poison].min()) > float(scores[clean].max())
