"""SIG property tests (docs/attacks.md): clean-label, target-class images only."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from bdframe.data import to_float, to_uint8
from bdframe.errors import UserError
from bdframe.testing import tiny_imageset
from bdframe_attack_sig.plugin import SIG, SIGConfig, signal

SET = settings(max_examples=20, deadline=None)


@SET
@given(n=st.integers(20, 300), rate=st.floats(0.01, 0.99), seed=st.integers(0, 2**40), target=st.integers(0, 3))
def test_only_target_class_and_labels_never_change(n, rate, seed, target):
    train = tiny_imageset(n, num_classes=4, size=8)
    ps = SIG(SIGConfig(poison_rate=rate, target=target)).poison_train(train, seed=seed)
    n_target = int((train.labels == target).sum())
    assert len(ps.poison_ids) == min(int(n * rate), n_target) == len(set(ps.poison_ids.tolist()))
    assert len(ps.cover_ids) == 0
    assert torch.equal(ps.data.labels, train.labels), "clean-label attack changed a label"
    pos = ps.data.contains(ps.poison_ids)
    assert (train.labels[pos] == target).all()
    changed = (ps.data.images != train.images).flatten(1).any(1)
    assert not changed[~pos].any(), "SIG touched a non-poisoned sample"
    assert ps.meta["capped"] == (int(n * rate) > n_target)


@SET
@given(delta=st.floats(0.01, 0.5), freq=st.floats(0.5, 12), size=st.integers(8, 40))
def test_signal_math(delta, freq, size):
    v = signal(3, size, size, delta, freq)
    j = torch.arange(size, dtype=torch.float64)
    row = (delta * torch.sin(2 * math.pi * j * freq / size)).float()
    assert torch.equal(v, row.expand(3, size, size))
    train = tiny_imageset(40, num_classes=4, size=size)
    ps = SIG(SIGConfig(poison_rate=0.1, target=0, delta=delta, frequency=freq)).poison_train(train, seed=0)
    pos = ps.data.contains(ps.poison_ids)
    assert torch.equal(ps.data.images[pos], to_uint8((to_float(train.images[pos]) + v).clamp(0, 1)))


def test_defaults_toolbox():
    c = SIGConfig()
    assert c.delta == 30 / 255 and c.frequency == 6 and c.target == 1 and c.poison_rate == 0.05


def test_too_few_cap_or_error():
    train = tiny_imageset(100, num_classes=10, size=8)  # 10 target images; 0.5 * 100 = 50 wanted
    ps = SIG(SIGConfig(poison_rate=0.5)).poison_train(train, seed=0)
    assert len(ps.poison_ids) == 10 and ps.meta["capped"]
    with pytest.raises(UserError, match=r"\$\.attack\.poison_rate: .*50 exceeds the 10 images of class 1"):
        SIG(SIGConfig(poison_rate=0.5, too_few="error")).poison_train(train, seed=0)


def test_asr_set_non_target_with_signal():
    test = tiny_imageset(80, num_classes=4, size=32, seed=3)
    asr = SIG(SIGConfig(target=2)).poison_test(test)
    assert len(asr) == 60 and (asr.labels == 2).all()
    clean = test.images[test.positions(asr.ids)]
    assert torch.equal(asr.images, to_uint8((to_float(clean) + signal(3, 32, 32, 30 / 255, 6)).clamp(0, 1)))
