"""WaNet property tests (docs/attacks.md)."""

import attrs
import pytest
import torch
from hypothesis import given, settings, strategies as st

from bdframe.data import DatasetInfo, to_float, to_uint8
from bdframe.errors import UserError
from bdframe.testing import tiny_imageset
from bdframe_attack_wanet.plugin import WaNet, WaNetConfig, warp, warp_field

SET = settings(max_examples=20, deadline=None)


@SET
@given(n=st.integers(20, 300), rate=st.floats(0.01, 0.6), cover=st.floats(0.0, 0.39), seed=st.integers(0, 2**40),
       noise=st.sampled_from(["shared", "per-sample"]))
def test_exact_counts_disjoint_and_labels(n, rate, cover, seed, noise):
    train = tiny_imageset(n, num_classes=4, size=8)
    ps = WaNet(WaNetConfig(poison_rate=rate, cover_rate=cover, noise=noise)).poison_train(train, seed=seed)
    assert len(ps.poison_ids) == int(n * rate) and len(ps.cover_ids) == int(n * cover)
    assert not set(ps.poison_ids.tolist()) & set(ps.cover_ids.tolist())
    p, c = ps.data.contains(ps.poison_ids), ps.data.contains(ps.cover_ids)
    assert (ps.data.labels[p] == 1).all() and torch.equal(ps.data.labels[c], train.labels[c])
    rest = ~(p | c)
    assert torch.equal(ps.data.images[rest], train.images[rest]) and torch.equal(ps.data.labels[rest], train.labels[rest])


@SET
@given(size=st.integers(4, 40), k=st.integers(1, 4), seed=st.integers(0, 2**40))
def test_warp_is_identity_at_s0(size, k, seed):
    train = tiny_imageset(30, num_classes=3, size=size)
    atk = WaNet(WaNetConfig(poison_rate=0.5, cover_rate=0.0, s=0.0, k=min(k, size)))
    ps = atk.poison_train(train, seed=seed)
    assert torch.equal(ps.data.images, train.images)
    test = tiny_imageset(30, num_classes=3, size=size, seed=1)
    asr = atk.poison_test(test)
    assert torch.equal(asr.images, test.images[test.labels != 1])


def test_field_layout_and_range():
    ident, noise, grid = warp_field(32, 32, 4, 0.5, 1.0, seed=0)
    lin = torch.linspace(-1, 1, 32)
    assert ident.shape == (1, 32, 32, 2) and noise.shape == (1, 32, 32, 2)
    assert torch.equal(ident[0, 5, :, 0], lin) and (ident[0, 5, :, 1] == lin[5]).all()  # x = column
    assert torch.equal(ident[0, :, 7, 1], lin) and (ident[0, :, 7, 0] == lin[7]).all()  # y = row
    assert grid.min() >= -1 and grid.max() <= 1
    disp = (grid - ident).abs() * 31 / 2  # in pixels
    assert 0.05 < disp.mean() < 1.0 and disp.max() < 3  # sub-pixel to about a pixel
    ident2, noise2, _ = warp_field(32, 32, 4, 0.5, 1.0, seed=0)
    assert torch.equal(noise, noise2)
    assert not torch.equal(noise, warp_field(32, 32, 4, 0.5, 1.0, seed=1)[1])


def test_test_set_uses_the_training_field_and_meta_rebuilds_it():
    train = tiny_imageset(100, num_classes=4, size=16)
    atk = WaNet(WaNetConfig(poison_rate=0.2, cover_rate=0.1))
    ps = atk.poison_train(train, seed=11)
    rows = ps.data.contains(ps.poison_ids)
    # a test set made of the clean versions of the poisoned images (true labels != target)
    sub = train.subset(rows & (train.labels != 1))
    asr = atk.poison_test(sub)
    assert torch.equal(asr.images, ps.data.images[rows & (train.labels != 1)])
    _, _, grid = warp_field(16, 16, 4, 0.5, 1.0, ps.meta["grid_seed"])
    assert torch.equal(asr.images, to_uint8(warp(to_float(sub.images), grid)))
    again = WaNet(attrs.evolve(atk.config, grid_seed=ps.meta["grid_seed"]))
    assert torch.equal(again.poison_test(sub).images, asr.images)


def test_poison_test_needs_the_field():
    test = tiny_imageset(20, size=8)
    with pytest.raises(UserError, match="grid_seed"):
        WaNet().poison_test(test)
    assert len(WaNet(WaNetConfig(grid_seed=3)).poison_test(test)) == 15


def test_fixed_grid_seed_is_independent_of_run_seed():
    train = tiny_imageset(60, size=8)
    a = WaNet(WaNetConfig(grid_seed=5))
    a.poison_train(train, seed=1)
    b = WaNet(WaNetConfig(grid_seed=5))
    b.poison_train(train, seed=2)
    assert a.field_seed == b.field_seed == 5


def test_shared_vs_per_sample_noise():
    same = tiny_imageset(100, size=16)
    same = same.with_images(same.images[:1].expand(100, -1, -1, -1).clone())  # identical images
    for noise, distinct in (("shared", 1), ("per-sample", 20)):
        ps = WaNet(WaNetConfig(poison_rate=0.1, cover_rate=0.2, noise=noise)).poison_train(same, seed=0)
        covers = ps.data.images[ps.data.contains(ps.cover_ids)]
        assert len(torch.unique(covers.flatten(1), dim=0)) == distinct
        poisons = ps.data.images[ps.data.contains(ps.poison_ids)]
        assert len(torch.unique(poisons.flatten(1), dim=0)) == 1
        assert not torch.equal(covers[0], poisons[0])


def test_checks():
    info = DatasetInfo(10, 3, 32, 32, (0.5,) * 3, (0.25,) * 3)
    assert WaNet(WaNetConfig(k=33)).check_dataset(info)[0][0] == "k"
    assert WaNetConfig(poison_rate=0.7, cover_rate=0.5).check()[0][0] == "cover_rate"
    assert WaNetConfig().cover_rate == 0.05 and WaNetConfig().noise == "shared"
    with pytest.raises(ValueError, match="must be one of 'shared', 'per-sample'"):
        WaNetConfig(noise="fresh")
