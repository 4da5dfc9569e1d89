"""Blend property tests (docs/attacks.md)."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from bdframe.data import DatasetInfo, to_float, to_uint8
from bdframe.testing import tiny_imageset
from bdframe_attack_blend.plugin import Blend, BlendConfig
from bdframe_attack_common import patterns

SET = settings(max_examples=20, deadline=None)
INFO = DatasetInfo(10, 3, 32, 32, (0.5,) * 3, (0.25,) * 3)


@SET
@given(n=st.integers(20, 300), rate=st.floats(0.01, 0.99), seed=st.integers(0, 2**40), target=st.integers(0, 3))
def test_exact_count_labels_and_untouched_rest(n, rate, seed, target):
    train = tiny_imageset(n, num_classes=4, size=8)
    ps = Blend(BlendConfig(poison_rate=rate, target=target)).poison_train(train, seed=seed)
    assert len(ps.poison_ids) == int(n * rate) == len(set(ps.poison_ids.tolist()))
    assert len(ps.cover_ids) == 0
    pos = ps.data.contains(ps.poison_ids)
    assert (ps.data.labels[pos] == target).all()
    assert torch.equal(ps.data.images[~pos], train.images[~pos]) and torch.equal(ps.data.labels[~pos], train.labels[~pos])
    assert ps.data.images.dtype == torch.uint8 and ps.data.images.shape == train.images.shape


@SET
@given(alpha=st.floats(0.01, 1.0), seed=st.integers(0, 2**40))
def test_blend_math_whole_image(alpha, seed):
    train = tiny_imageset(40, num_classes=4, size=32)
    ps = Blend(BlendConfig(poison_rate=0.5, alpha=alpha)).poison_train(train, seed=seed)
    t, m = patterns.get("hellokitty")
    assert m.sum() == 32 * 32
    pos = ps.data.contains(ps.poison_ids)
    expected = to_uint8((1 - alpha) * to_float(train.images[pos]) + alpha * t)
    assert (expected.int() - ps.data.images[pos].int()).abs().max() <= 1  # float rounding only


def test_test_alpha_defaults_to_alpha_and_can_differ():
    test = tiny_imageset(40, num_classes=4, size=32, seed=2)
    black = test.with_images(torch.zeros_like(test.images))
    t, _ = patterns.get("hellokitty")
    a = Blend(BlendConfig(alpha=0.3)).poison_test(black)
    assert torch.equal(a.images[0], to_uint8(0.3 * t))
    b = Blend(BlendConfig(alpha=0.3, test_alpha=0.6)).poison_test(black)
    assert torch.equal(b.images[0], to_uint8(0.6 * t))
    assert len(a) == 30 and (a.labels == 1).all()


def test_user_trigger_is_blended_without_mask_unless_given(tmp_path):
    from torchvision.io import write_png

    pat = torch.zeros(3, 8, 8, dtype=torch.uint8)
    pat[1, :4] = 255  # half black: still blended there (no implicit mask for blend)
    write_png(pat, str(tmp_path / "t.png"))
    atk = Blend(BlendConfig(trigger_image=str(tmp_path / "t.png"), alpha=0.5))
    p, m = atk.trigger(3, 8, 8)
    assert m.sum() == 64 and torch.allclose(p[1, :4], torch.ones(4, 8))
    white = tiny_imageset(10, size=8).with_images(torch.full((10, 3, 8, 8), 255, dtype=torch.uint8))
    out = atk.poison_test(white)
    assert (out.images[:, :, 4:] == 128).all()  # 0.5 * 1 + 0.5 * 0 -> 127.5 -> 128
    m_img = torch.zeros(1, 8, 8, dtype=torch.uint8)
    m_img[0, 0, 0] = 255
    write_png(m_img, str(tmp_path / "m.png"))
    _, m2 = Blend(BlendConfig(trigger_image=str(tmp_path / "t.png"), mask_image=str(tmp_path / "m.png"))).trigger(3, 8, 8)
    assert m2.sum() == 1


def test_checks():
    assert Blend(BlendConfig(target=10)).check_dataset(INFO)[0][0] == "target"
    assert Blend(BlendConfig(trigger_image="/nonexistent.png")).check_dataset(INFO) == [
        ("trigger_image", "file '/nonexistent.png' does not exist")]
    assert BlendConfig(mask_image="m.png").check() == [("mask_image", "needs trigger_image")]
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        BlendConfig(alpha=0.0)
