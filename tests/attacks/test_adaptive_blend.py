"""Adaptive-Blend property tests (docs/attacks.md)."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from bdframe.data import DatasetInfo, to_uint8
from bdframe.testing import tiny_imageset
from bdframe_attack_adaptive_blend.plugin import AdaptiveBlend, AdaptiveBlendConfig, piece_masks
from bdframe_attack_common import patterns

SET = settings(max_examples=20, deadline=None)
INFO = DatasetInfo(10, 3, 32, 32, (0.5,) * 3, (0.25,) * 3)


def _black(n, size=32, classes=10):
    s = tiny_imageset(n, num_classes=classes, size=size)
    return s.with_images(torch.zeros_like(s.images))


@SET
@given(n=st.integers(20, 300), rate=st.floats(0.01, 0.6), cover=st.floats(0.0, 0.39), seed=st.integers(0, 2**40))
def test_exact_counts_disjoint_and_labels(n, rate, cover, seed):
    train = tiny_imageset(n, num_classes=4, size=8)
    ps = AdaptiveBlend(AdaptiveBlendConfig(poison_rate=rate, cover_rate=cover, pieces=4)).poison_train(train, seed=seed)
    assert len(ps.poison_ids) == int(n * rate) and len(ps.cover_ids) == int(n * cover)
    assert not set(ps.poison_ids.tolist()) & set(ps.cover_ids.tolist())
    p, c = ps.data.contains(ps.poison_ids), ps.data.contains(ps.cover_ids)
    assert (ps.data.labels[p] == 1).all() and torch.equal(ps.data.labels[c], train.labels[c])
    rest = ~(p | c)
    assert torch.equal(ps.data.images[rest], train.images[rest])


@SET
@given(pieces=st.sampled_from([4, 16, 64]), mask_rate=st.floats(0.0, 0.9), seed=st.integers(0, 2**40))
def test_train_trigger_covers_the_configured_fraction_of_pieces(pieces, mask_rate, seed):
    cfg = AdaptiveBlendConfig(poison_rate=0.2, cover_rate=0.1, pieces=pieces, mask_rate=mask_rate)
    if cfg.masked_pieces >= pieces:
        return
    train = _black(60)
    ps = AdaptiveBlend(cfg).poison_train(train, seed=seed)
    s = math.isqrt(pieces)
    b = 32 // s
    masked = ps.meta["poison_masked"] + ps.meta["cover_masked"]
    ids = torch.cat([ps.poison_ids, ps.cover_ids])
    assert len(masked) == len(ids) and all(len(m) == round(mask_rate * pieces) for m in masked)
    imgs = ps.data.images[ps.data.positions(ids)]
    # per piece: does the piece carry the trigger? (black image: any nonzero pixel)
    lit = imgs.view(len(ids), 3, s, b, s, b).amax(dim=(1, 3, 5)).flatten(1) > 0
    for row, m in zip(lit, masked):
        expected = torch.ones(pieces, dtype=torch.bool)
        expected[m] = False
        assert torch.equal(row, expected)
        assert int(row.sum()) == pieces - round(mask_rate * pieces)


def test_blend_math_and_per_sample_masks():
    train = _black(100)
    ps = AdaptiveBlend(AdaptiveBlendConfig(poison_rate=0.1, cover_rate=0.05, train_alpha=0.15)).poison_train(train, seed=0)
    t, _ = patterns.get("hellokitty")
    full = to_uint8(0.15 * t)
    imgs = ps.data.images[ps.data.contains(torch.cat([ps.poison_ids, ps.cover_ids]))]
    lit = imgs != 0
    assert torch.equal(imgs[lit], full.expand_as(imgs)[lit])  # trigger pixels are exactly the blend
    assert len({tuple(m) for m in ps.meta["poison_masked"]}) > 1  # masks differ per sample
    assert ps.meta["masked_pieces"] == 8 and ps.meta["pieces"] == 16


def test_piece_masks_uniform_and_row_major():
    g = torch.Generator().manual_seed(0)
    masks, idx = piece_masks(4000, 32, 32, 16, 8, g)
    counts = torch.bincount(idx.flatten(), minlength=16).float() / 4000
    assert ((counts - 0.5).abs() < 0.05).all()  # every piece masked about half of the time
    assert torch.all(masks.sum(dim=(1, 2, 3)) == 8 * 64)
    m, i = piece_masks(1, 32, 32, 16, 1, torch.Generator().manual_seed(1))
    k = int(i[0, 0])
    r, c = divmod(k, 4)
    assert (m[0, 0, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] == 0).all() and m.sum() == 15 * 64


def test_test_trigger_is_full_blend_at_test_alpha():
    test = _black(50)
    t, _ = patterns.get("hellokitty")
    asr = AdaptiveBlend(AdaptiveBlendConfig(train_alpha=0.15, test_alpha=0.3)).poison_test(test)
    assert len(asr) == 45 and (asr.labels == 1).all()
    assert torch.equal(asr.images, to_uint8(0.3 * t).expand_as(asr.images))


def test_defaults_meca():
    c = AdaptiveBlendConfig()
    assert (c.poison_rate, c.cover_rate, c.target, c.pieces, c.mask_rate, c.train_alpha, c.test_alpha) == \
        (0.05, 0.01, 1, 16, 0.5, 0.2, 0.2)


def test_checks():
    assert AdaptiveBlendConfig(pieces=10).check()[0] == ("pieces", "must be a square number (4, 9, 16, ...), got 10")
    assert AdaptiveBlendConfig(pieces=4, mask_rate=0.9).check()[0][0] == "mask_rate"
    field, msg = AdaptiveBlend(AdaptiveBlendConfig(pieces=9)).check_dataset(INFO)[0]
    assert field == "pieces" and "sqrt(pieces) = 3 must divide the image size 32x32" in msg
    assert AdaptiveBlend(AdaptiveBlendConfig(pieces=9)).check_dataset(
        DatasetInfo(10, 3, 27, 27, (0.5,) * 3, (0.25,) * 3)) == []
    assert AdaptiveBlend(AdaptiveBlendConfig(target=10)).check_dataset(INFO)[0][0] == "target"
    assert AdaptiveBlendConfig(poison_rate=0.9, cover_rate=0.2).check()[0][0] == "cover_rate"
    with pytest.raises(ValueError):
        AdaptiveBlendConfig(mask_rate=1.0)
