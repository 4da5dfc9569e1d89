"""Adaptive-Patch property tests (docs/attacks.md)."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from bdframe.data import DatasetInfo, to_float, to_uint8
from bdframe.testing import tiny_imageset
from bdframe_attack_adaptive_patch.plugin import AdaptivePatch, AdaptivePatchConfig
from bdframe_attack_common import patterns
from bdframe_attack_common.triggers import mask_blend

SET = settings(max_examples=20, deadline=None)
INFO = DatasetInfo(10, 3, 32, 32, (0.5,) * 3, (0.25,) * 3)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(20, 120), rate=st.floats(0.01, 0.6), cover=st.floats(0.0, 0.39), seed=st.integers(0, 2**40),
       preset=st.sampled_from(["firefox-x4", "toolbox", "hellokitty-x4"]))
def test_counts_assignment_and_pixels_outside_the_trigger_mask(n, rate, cover, seed, preset):
    train = tiny_imageset(n, num_classes=4, size=32)
    atk = AdaptivePatch(AdaptivePatchConfig(poison_rate=rate, cover_rate=cover, preset=preset))
    ps = atk.poison_train(train, seed=seed)
    n_p, n_c = int(n * rate), int(n * cover)
    assert len(ps.poison_ids) == n_p and len(ps.cover_ids) == n_c
    assert not set(ps.poison_ids.tolist()) & set(ps.cover_ids.tolist())
    assert torch.equal(ps.poison_ids, torch.sort(ps.poison_ids).values)
    triggers = atk.train_triggers(3, 32, 32)
    for ids, which, count in ((ps.poison_ids, ps.meta["poison_trigger"], n_p), (ps.cover_ids, ps.meta["cover_trigger"], n_c)):
        # consecutive parts: trigger j for number p is the smallest j with p < (j+1) * count / 4
        assert which == [min(j for j in range(4) if p < (j + 1) * count / 4) for p in range(count)]
        for i, j in zip(ids.tolist(), which):
            pos = int(ps.data.positions([i]))
            pattern, mask, alpha = triggers[j]
            outside = (mask[0] == 0).expand(3, 32, 32)
            assert torch.equal(ps.data.images[pos][outside], train.images[pos][outside])
            assert torch.equal(ps.data.images[pos], to_uint8(mask_blend(to_float(train.images[pos]), pattern, mask, alpha)))
    p, c = ps.data.contains(ps.poison_ids), ps.data.contains(ps.cover_ids)
    assert (ps.data.labels[p] == 1).all() and torch.equal(ps.data.labels[c], train.labels[c])
    assert torch.equal(ps.data.images[~(p | c)], train.images[~(p | c)])


def test_firefox_x4_default_test_trigger_is_the_whole_icon():
    atk = AdaptivePatch()
    trig = atk.train_triggers(3, 32, 32)
    assert [a for *_, a in trig] == [1.0] * 4
    for k, (p, m, _) in enumerate(trig, 1):
        ref = patterns.get(f"firefox-corner-split-{k}")
        assert torch.equal(p, ref[0]) and torch.equal(m, ref[1])
    test = tiny_imageset(40, num_classes=4, size=32)
    asr = atk.poison_test(test)
    icon, mask = patterns.get("firefox-corner")
    clean = to_float(test.images[test.labels != 1])
    assert torch.equal(asr.images, to_uint8(clean + mask * (icon - clean)))
    assert len(asr) == 30 and (asr.labels == 1).all()


def test_toolbox_preset():
    atk = AdaptivePatch(AdaptivePatchConfig(preset="toolbox"))
    assert [a for *_, a in atk.train_triggers(3, 32, 32)] == [0.5, 0.2, 0.5, 0.3]
    tests = atk.test_triggers(3, 32, 32)
    assert [a for *_, a in tests] == [1.0, 1.0]
    assert torch.equal(tests[0][1], patterns.get("phoenix-corner2")[1])
    assert torch.equal(tests[1][1], patterns.get("badnet-patch4")[1])


def test_hellokitty_x4_test_is_full_blend():
    atk = AdaptivePatch(AdaptivePatchConfig(preset="hellokitty-x4"))
    test = tiny_imageset(20, num_classes=4, size=32)
    black = test.with_images(torch.zeros_like(test.images))
    t, _ = patterns.get("hellokitty")
    assert torch.equal(atk.poison_test(black).images[0], to_uint8(0.2 * t))


def test_overrides_and_user_files(tmp_path):
    from torchvision.io import write_png

    paths = []
    for k in range(3):
        img = torch.zeros(3, 32, 32, dtype=torch.uint8)
        img[k, k * 4:(k + 1) * 4, :4] = 255
        paths.append(str(tmp_path / f"t{k}.png"))
        write_png(img, paths[-1])
    atk = AdaptivePatch(AdaptivePatchConfig(trigger_images=tuple(paths), train_alphas=(1.0, 0.5, 1.0)))
    trig = atk.train_triggers(3, 32, 32)
    assert len(trig) == 3 and [m.sum().item() for _, m, _ in trig] == [16, 16, 16]
    assert [a for *_, a in atk.test_triggers(3, 32, 32)] == [1.0, 1.0, 1.0]
    ps = atk.poison_train(tiny_imageset(90, num_classes=4, size=32), seed=0)
    assert sorted(set(ps.meta["poison_trigger"])) == [0, 1, 2] and ps.meta["preset"] is None
    asr = atk.poison_test(tiny_imageset(20, num_classes=4, size=32))
    assert (asr.images[:, 0, :4, :4] == 255).all() and (asr.images[:, 2, 8:12, :4] == 255).all()
    assert AdaptivePatch(AdaptivePatchConfig(test_alpha=0.5)).test_triggers(3, 32, 32)[0][2] == 0.5


def test_checks():
    assert AdaptivePatchConfig(train_alphas=(1.0,)).check()[0] == (
        "train_alphas", "needs one alpha per training trigger (4), got 1")
    assert AdaptivePatchConfig(mask_images=("a.png",)).check()[0] == ("mask_images", "needs trigger_images")
    assert AdaptivePatchConfig(trigger_images=("a.png", "b.png"), mask_images=("",)).check()[0][0] == "mask_images"
    assert AdaptivePatchConfig(trigger_images=()).check()[0][0] == "trigger_images"
    assert AdaptivePatchConfig(poison_rate=0.9, cover_rate=0.2).check()[0][0] == "cover_rate"
    assert AdaptivePatch(AdaptivePatchConfig(target=10)).check_dataset(INFO)[0][0] == "target"
    small = DatasetInfo(10, 3, 10, 10, (0.5,) * 3, (0.25,) * 3)
    field, msg = AdaptivePatch().check_dataset(small)[0]
    assert field == "preset" and "14x14" in msg
    assert AdaptivePatch(AdaptivePatchConfig(preset="hellokitty-x4")).check_dataset(small) == []
    assert AdaptivePatch(AdaptivePatchConfig(trigger_images=("/nope.png",))).check_dataset(INFO) == [
        ("trigger_images[0]", "file '/nope.png' does not exist")]
    with pytest.raises(ValueError, match="must be one of"):
        AdaptivePatchConfig(preset="firefox")
