"""BadNet property tests (docs/attacks.md)."""

import torch
from hypothesis import given, settings, strategies as st

from bdframe.testing import check_attack_contract, tiny_imageset
from bdframe_attack_badnet.plugin import BadNet, BadNetConfig

SET = settings(max_examples=25, deadline=None)


@SET
@given(n=st.integers(20, 300), rate=st.floats(0.01, 0.99), seed=st.integers(0, 2**40), target=st.integers(0, 3))
def test_exact_count_unique_ids_labels(n, rate, seed, target):
    train = tiny_imageset(n, num_classes=4, size=8)
    ps = BadNet(BadNetConfig(poison_rate=rate, target=target)).poison_train(train, seed=seed)
    assert len(ps.poison_ids) == int(n * rate)
    assert len(set(ps.poison_ids.tolist())) == len(ps.poison_ids)
    assert (ps.data.labels[ps.data.contains(ps.poison_ids)] == target).all()
    assert len(ps.cover_ids) == 0


@SET
@given(seed=st.integers(0, 2**40), other=st.integers(0, 2**40))
def test_deterministic_under_seed_and_independent_of_image_content(seed, other):
    a = tiny_imageset(100, size=8, seed=0)
    b = tiny_imageset(100, size=8, seed=1)  # same ids/labels, other pixels
    atk = BadNet(BadNetConfig(poison_rate=0.2))
    assert torch.equal(atk.poison_train(a, seed=seed).poison_ids, atk.poison_train(b, seed=seed).poison_ids)
    if other != seed:
        assert not torch.equal(atk.poison_train(a, seed=seed).poison_ids, atk.poison_train(a, seed=other).poison_ids)


@SET
@given(patch=st.integers(1, 6), pos=st.sampled_from(["bottom-right", "bottom-left", "top-right", "top-left", "center"]),
       alpha=st.floats(0.05, 1.0), size=st.integers(8, 20))
def test_pixels_outside_mask_unchanged_and_values_in_range(patch, pos, alpha, size):
    train = tiny_imageset(60, size=size)
    atk = BadNet(BadNetConfig(poison_rate=0.5, patch_size=patch, position=pos, alpha=alpha))
    ps = atk.poison_train(train, seed=1)
    _, mask = atk.trigger(3, size, size)
    assert int(mask.sum()) == patch * patch
    outside = (mask == 0).expand(3, size, size)
    rows = ps.data.contains(ps.poison_ids)
    assert torch.equal(ps.data.images[rows][:, outside], train.images[rows][:, outside])
    assert ps.data.images.dtype == torch.uint8 and ps.data.images.shape == train.images.shape
    if alpha == 1.0:
        inside = (mask == 1).expand(3, size, size)
        assert (ps.data.images[rows][:, inside] == 255).all()


def test_default_trigger_is_white_3x3_bottom_right():
    pattern, mask = BadNet().trigger(3, 32, 32)
    assert mask[0, 29:, 29:].eq(1).all() and mask.sum() == 9
    assert pattern[:, 29:, 29:].eq(1).all() and pattern.sum() == 27


def test_x_pattern_matches_toolbox_layout():
    pattern, mask = BadNet(BadNetConfig(pattern="x")).trigger(1, 32, 32)
    ones = {tuple(p) for p in torch.nonzero(pattern[0]).tolist()}
    assert ones == {(29, 31), (30, 30), (31, 29), (31, 31)} and mask.sum() == 9


def test_asr_set_excludes_target_class_and_carries_trigger():
    test = tiny_imageset(80, num_classes=4, size=8)
    asr = BadNet(BadNetConfig(target=2)).poison_test(test)
    assert len(asr) == 60 and (asr.labels == 2).all()
    assert not torch.isin(asr.ids, test.ids[test.labels == 2]).any()
    assert (asr.images[:, :, 5:, 5:] == 255).all()


def test_user_trigger_image_and_mask(tmp_path):
    from torchvision.io import write_png

    pat = torch.zeros(3, 8, 8, dtype=torch.uint8)
    pat[0, :2, :2] = 200  # red 2x2 top-left; black elsewhere -> implicit mask
    write_png(pat, str(tmp_path / "t.png"))
    atk = BadNet(BadNetConfig(trigger_image=str(tmp_path / "t.png")))
    pattern, mask = atk.trigger(3, 8, 8)
    assert mask.sum() == 4 and torch.allclose(pattern[0, :2, :2], torch.full((2, 2), 200 / 255))
    m = torch.zeros(1, 8, 8, dtype=torch.uint8)
    m[0, 7, 7] = 255
    write_png(m, str(tmp_path / "m.png"))
    _, mask2 = BadNet(BadNetConfig(trigger_image=str(tmp_path / "t.png"), mask_image=str(tmp_path / "m.png"))).trigger(3, 8, 8)
    assert mask2.sum() == 1 and mask2[0, 7, 7] == 1


def test_dataset_checks():
    from bdframe.data import DatasetInfo

    info = DatasetInfo(10, 3, 32, 32, (0.5,) * 3, (0.25,) * 3)
    assert BadNet(BadNetConfig(target=10)).check_dataset(info)[0][0] == "target"
    assert BadNet(BadNetConfig(patch_size=33)).check_dataset(info)[0][0] == "patch_size"
    assert BadNet(BadNetConfig(trigger_image="/nonexistent.png")).check_dataset(info)[0][0] == "trigger_image"


def test_contract():
    check_attack_contract(BadNet(), tiny_imageset(200), tiny_imageset(50, seed=1))
