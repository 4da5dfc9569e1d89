"""PhysicalBA property tests (docs/attacks.md): patch trigger + train-time physical transforms."""

import attrs
import pytest
import torch
from hypothesis import example, given, settings, strategies as st

from bdframe.data import Batches, DatasetInfo, to_float, to_uint8
from bdframe.testing import tiny_imageset
from bdframe_attack_common import patterns
from bdframe_attack_physicalba.plugin import PhysicalBA, PhysicalBAConfig, PhysicalTransform, affine, physical

SET = settings(max_examples=15, deadline=None)
INFO = DatasetInfo(10, 3, 32, 32, (0.5,) * 3, (0.25,) * 3)
IDENTITY = dict(flip_p=0.0, brightness=0.0, contrast=0.0, degrees=0.0, translate=0.0, scale_min=1.0, scale_max=1.0)


@SET
@given(n=st.integers(20, 300), rate=st.floats(0.01, 0.99), seed=st.integers(0, 2**40),
       pattern=st.sampled_from(["firefox-corner", "firefox-icon", "white-square"]))
def test_exact_count_and_pixels_outside_mask_unchanged(n, rate, seed, pattern):
    train = tiny_imageset(n, num_classes=4, size=16)
    atk = PhysicalBA(PhysicalBAConfig(poison_rate=rate, pattern=pattern))
    ps = atk.poison_train(train, seed=seed)
    assert len(ps.poison_ids) == int(n * rate) and len(ps.cover_ids) == 0
    p, mask = atk.trigger(3, 16, 16)
    rows = ps.data.contains(ps.poison_ids)
    outside = (mask[0] == 0).expand(3, 16, 16)
    assert torch.equal(ps.data.images[rows][:, outside], train.images[rows][:, outside])
    inside = (mask[0] == 1).expand(3, 16, 16)
    assert (ps.data.images[rows][:, inside] == to_uint8(p)[inside]).all()  # alpha 1: replaced
    assert (ps.data.labels[rows] == 1).all() and torch.equal(ps.data.images[~rows], train.images[~rows])


def test_default_is_firefox_corner_alpha1_and_test_set_without_transform():
    atk = PhysicalBA()
    p, m = atk.trigger(3, 32, 32)
    ref_p, ref_m = patterns.get("firefox-corner")
    assert torch.equal(p, ref_p) and torch.equal(m, ref_m) and atk.config.alpha == 1.0
    train, test = tiny_imageset(100, 10, 32), tiny_imageset(50, 10, 32, seed=1)
    ps = atk.poison_train(train, seed=0)
    assert isinstance(ps.data.transform, PhysicalTransform) and ps.data.transform.ids is None  # "all"
    asr = atk.poison_test(test)
    assert asr.transform is None and len(asr) == 45
    clean = to_float(test.images[test.labels != 1])
    assert torch.equal(asr.images, to_uint8(clean + m * (p - clean)))


def test_transform_on_poison_only_leaves_clean_samples_alone():
    train = tiny_imageset(120, 10, 32)
    ps = PhysicalBA(PhysicalBAConfig(transform_on="poison", poison_rate=0.25)).poison_train(train, seed=2)
    poisoned = ps.data.contains(ps.poison_ids)
    changed_any = torch.zeros(len(train), dtype=torch.bool)
    for x, _, ids in Batches(ps.data, 32, generator=torch.Generator().manual_seed(0)):
        pos = ps.data.positions(ids)
        raw = to_float(ps.data.images[pos])
        assert torch.equal(x[~poisoned[pos]], raw[~poisoned[pos]])
        changed_any[pos] = (x != raw).flatten(1).any(1)
    assert changed_any[poisoned].all()  # scale 0.8-0.9 always changes an image


def test_transform_on_all_changes_clean_samples():
    train = tiny_imageset(64, 10, 32)
    ps = PhysicalBA().poison_train(train, seed=2)
    x, _, ids = next(iter(Batches(ps.data, 64)))
    assert (x != to_float(ps.data.images)).flatten(1).any(1).all()


def test_inner_transform_runs_first():
    seen = []

    def inner(x, ids, g):
        seen.append(len(ids))
        return x

    train = attrs.evolve(tiny_imageset(40, 4, 16), transform=inner)
    ps = PhysicalBA().poison_train(train, seed=0)
    list(Batches(ps.data, 20))
    assert seen == [20, 20]


def test_identity_parameters_give_identity():
    x = torch.rand(8, 3, 32, 32)
    out = physical(x, torch.Generator().manual_seed(0), PhysicalBAConfig(**IDENTITY))
    assert torch.equal(out, x)


@SET
@given(angle=st.floats(-10, 10), tx=st.integers(-3, 3), ty=st.integers(-3, 3), scale=st.floats(0.8, 0.9),
       size=st.sampled_from([16, 32]))
@example(angle=0.0, tx=0, ty=1, scale=0.85, size=32)
def test_affine_matches_torchvision(angle, tx, ty, scale, size):
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    ref = TF.affine(x, angle=angle, translate=[tx, ty], scale=scale, shear=[0.0, 0.0],
                    interpolation=InterpolationMode.NEAREST)
    # float64 parameters, as torchvision receives them: a float32 scale of 0.85 is 0.85000002,
    # which moves whole rows of sample points across a nearest-neighbour tie
    out = affine(x, *(torch.tensor([float(v)], dtype=torch.float64) for v in (angle, tx, ty, scale)))
    assert (out != ref).float().mean() < 0.01  # equal up to nearest-neighbour ties


def test_parameter_ranges():
    g = torch.Generator().manual_seed(0)
    grey = torch.full((200, 3, 32, 32), 0.5)
    # brightness only: factor in [0.8, 1.2] on a flat image
    out = physical(grey, g, PhysicalBAConfig(**{**IDENTITY, "brightness": 0.2}))
    v = out[:, 0, 0, 0]
    assert v.min() >= 0.4 - 1e-6 and v.max() <= 0.6 + 1e-6 and v.std() > 0.02
    # the affine always shrinks (scale 0.8-0.9, no shift): the border becomes zero fill
    ones = torch.ones(50, 3, 32, 32)
    out = physical(ones, g, PhysicalBAConfig(**{**IDENTITY, "scale_min": 0.8, "scale_max": 0.9}))
    assert (out[:, :, 0, :] == 0).all() and (out[:, :, 16, 16] == 1).all()
    # flips happen about half the time
    ramp = torch.arange(32.0).expand(400, 3, 32, 32) / 31
    out = physical(ramp, g, PhysicalBAConfig(**{**IDENTITY, "flip_p": 0.5}))
    flipped = (out[:, 0, 0, 0] == 1).float().mean()
    assert 0.4 < flipped < 0.6


def test_transform_deterministic_and_on_device_dtype():
    train = tiny_imageset(50, 10, 32)
    t = PhysicalBA().poison_train(train, seed=0).data.transform
    x = to_float(train.images)
    a = t(x, train.ids, torch.Generator().manual_seed(3))
    b = t(x, train.ids, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.dtype == x.dtype and a.min() >= 0 and a.max() <= 1


def test_checks():
    assert PhysicalBA(PhysicalBAConfig(target=10)).check_dataset(INFO)[0][0] == "target"
    small = DatasetInfo(10, 3, 12, 12, (0.5,) * 3, (0.25,) * 3)
    field, msg = PhysicalBA().check_dataset(small)[0]
    assert field == "pattern" and "14x14" in msg
    assert PhysicalBA(PhysicalBAConfig(pattern="white-square", patch_size=13)).check_dataset(small)[0][0] == "patch_size"
    assert PhysicalBAConfig(scale_min=0.95).check()[0][0] == "scale_min"
    assert PhysicalBA(PhysicalBAConfig(trigger_image="/nope.png")).check_dataset(INFO)[0][0] == "trigger_image"
    with pytest.raises(ValueError, match="must be one of 'all', 'poison'"):
        PhysicalBAConfig(transform_on="clean")
