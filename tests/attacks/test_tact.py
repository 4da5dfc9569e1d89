"""TaCT property tests (docs/attacks.md): source-specific poisons, cover-class covers."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from bdframe.data import DatasetInfo, to_uint8
from bdframe.errors import UserError
from bdframe.testing import tiny_imageset
from bdframe_attack_common import patterns
from bdframe_attack_tact.plugin import TaCT, TaCTConfig

SET = settings(max_examples=20, deadline=None)
INFO = DatasetInfo(10, 3, 32, 32, (0.5,) * 3, (0.25,) * 3)


@SET
@given(n=st.integers(40, 400), rate=st.floats(0.01, 0.3), cover=st.floats(0.0, 0.3), seed=st.integers(0, 2**40),
       pattern=st.sampled_from(["white-square", "trojan-square"]))
def test_poisons_only_source_covers_only_cover_classes(n, rate, cover, seed, pattern):
    train = tiny_imageset(n, num_classes=10, size=16)
    atk = TaCT(TaCTConfig(poison_rate=rate, cover_rate=cover, pattern=pattern))
    ps = atk.poison_train(train, seed=seed)
    n_src = int((train.labels == 0).sum())
    n_cov = int(((train.labels == 5) | (train.labels == 7)).sum())
    assert len(ps.poison_ids) == min(int(n * rate), n_src)
    assert len(ps.cover_ids) == min(int(n * cover), n_cov)
    p, c = ps.data.contains(ps.poison_ids), ps.data.contains(ps.cover_ids)
    assert (train.labels[p] == 0).all() and (ps.data.labels[p] == 1).all()
    assert torch.isin(train.labels[c], torch.tensor([5, 7])).all() and torch.equal(ps.data.labels[c], train.labels[c])
    _, mask = atk.trigger(3, 16, 16)
    outside = (mask[0] == 0).expand(3, 16, 16)
    assert torch.equal(ps.data.images[:, outside], train.images[:, outside])  # only the patch changes
    rest = ~(p | c)
    assert torch.equal(ps.data.images[rest], train.images[rest]) and torch.equal(ps.data.labels[rest], train.labels[rest])


def test_meca_defaults_and_white_square():
    c = TaCTConfig()
    assert (c.source, c.target, c.cover_classes, c.poison_rate, c.cover_rate) == (0, 1, (5, 7), 0.05, 0.01)
    p, m = TaCT().trigger(3, 32, 32)
    assert torch.equal(m, patterns.get("white-square")[1]) and m.sum() == 9
    _, mt = TaCT(TaCTConfig(pattern="trojan-square")).trigger(3, 32, 32)
    assert mt[0, 21:29, 21:29].all() and mt.sum() == 64


def test_asr_set_is_source_class_only():
    test = tiny_imageset(100, num_classes=10, size=32, seed=4)
    atk = TaCT()
    asr = atk.poison_test(test)
    assert len(asr) == 10 and (asr.labels == 1).all()
    assert (test.labels[test.positions(asr.ids)] == 0).all()
    assert (asr.images[:, :, 29:, 29:] == 255).all()


def test_too_few():
    train = tiny_imageset(100, num_classes=10, size=8)  # 10 per class
    ps = TaCT(TaCTConfig(poison_rate=0.5, cover_rate=0.5)).poison_train(train, seed=0)
    assert len(ps.poison_ids) == 10 and len(ps.cover_ids) == 20
    with pytest.raises(UserError, match=r"\$\.attack\.poison_rate: .*50 source-class \(0\) images .* has 10"):
        TaCT(TaCTConfig(poison_rate=0.5, too_few="error")).poison_train(train, seed=0)
    with pytest.raises(UserError, match=r"\$\.attack\.cover_rate"):
        TaCT(TaCTConfig(cover_rate=0.5, too_few="error")).poison_train(train, seed=0)


def test_config_and_dataset_checks():
    assert TaCTConfig(source=1, target=1).check()[0][0] == "target"
    assert TaCTConfig(cover_classes=(0, 5)).check()[0] == (
        "cover_classes", "must exclude the source (0) and target (1) classes, got [0, 5]")
    assert TaCTConfig(cover_classes=(5, 5)).check()[0][0] == "cover_classes"
    assert TaCTConfig(cover_classes=()).check()[0][0] == "cover_classes"
    assert TaCTConfig(cover_classes=(), cover_rate=0.0).check() == []
    small = DatasetInfo(6, 3, 32, 32, (0.5,) * 3, (0.25,) * 3)
    assert TaCT().check_dataset(small) == [("cover_classes", "must be class indices in [0, 5], got [7]")]
    assert TaCT(TaCTConfig(source=12)).check_dataset(INFO)[0][0] == "source"
    tiny = DatasetInfo(10, 3, 8, 8, (0.5,) * 3, (0.25,) * 3)
    assert TaCT(TaCTConfig(pattern="trojan-square")).check_dataset(tiny)[0][0] == "pattern"


def test_alpha_blend():
    train = tiny_imageset(100, num_classes=10, size=32)
    ps = TaCT(TaCTConfig(alpha=0.5)).poison_train(train, seed=1)
    p = ps.data.contains(ps.poison_ids)
    x = train.images[p].float() / 255
    expected = to_uint8(x + 0.5 * (1 - x))[:, :, 29:, 29:]
    assert torch.equal(ps.data.images[p][:, :, 29:, 29:], expected)
