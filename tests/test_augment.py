"""Batched contrastive views: identity settings are the identity, each step matches its
definition (checked against torchvision's per-image functions), per-image randomness that
follows the generator."""

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

from bdframe.augment import ContrastiveViews, gaussian_blur, grayscale, hsv_to_rgb, rgb_to_hsv

NOTHING = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, jitter_p=0.0, gray_p=0.0, blur_p=0.0)


def images(seed=0, n=6, c=3, size=16):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_identity_settings_give_the_images_back(interpolation):
    x = images()
    y = ContrastiveViews(**NOTHING, interpolation=interpolation)(x, torch.Generator().manual_seed(0))
    assert torch.allclose(y, x, atol=1e-5)


def test_full_crop_with_flip_is_the_image_or_its_mirror():
    x = images(n=32)
    y = ContrastiveViews(**dict(NOTHING, flip=True), interpolation="bilinear")(x, torch.Generator().manual_seed(1))
    same = (y - x).abs().flatten(1).amax(1) < 1e-5
    mirrored = (y - x.flip(3)).abs().flatten(1).amax(1) < 1e-5
    assert (same | mirrored).all() and same.any() and mirrored.any()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1))
def test_views_stay_in_range_follow_the_seed_and_differ_per_image(seed):
    x = images(seed % 7, n=8)
    x[1] = x[0]  # the same image twice in a batch gets two different views
    aug = ContrastiveViews()
    a = aug(x, torch.Generator().manual_seed(seed))
    b = aug(x, torch.Generator().manual_seed(seed))
    assert a.shape == x.shape and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert not torch.allclose(a[0], a[1])


def test_grayscale_step():
    x = images()
    y = ContrastiveViews(**dict(NOTHING, gray_p=1.0))(x, torch.Generator().manual_seed(0))
    assert torch.allclose(y[:, 0], y[:, 1]) and torch.allclose(y[:, 1], y[:, 2])
    assert torch.allclose(grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6)


def test_hsv_round_trip_and_hue_matches_torchvision():
    x = images(n=4)
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-5)
    shifted = hsv_to_rgb(torch.cat([(rgb_to_hsv(x)[:, :1] + 0.07) % 1.0, rgb_to_hsv(x)[:, 1:]], 1))
    assert torch.allclose(shifted, TF.adjust_hue(x, 0.07), atol=1e-4)


def test_blur_matches_torchvision_per_image():
    x = images(n=3)
    sigma = torch.tensor([0.3, 1.0, 2.0])
    y = gaussian_blur(x, sigma, 3)
    for i in range(3):
        want = TF.gaussian_blur(x[i], [3, 3], [float(sigma[i])] * 2)
        assert torch.allclose(y[i], want, atol=1e-5), i
    flat = torch.full((2, 3, 8, 8), 0.3)
    assert torch.allclose(gaussian_blur(flat, torch.tensor([0.5, 2.0]), 3), flat)


def test_single_channel_images_skip_the_colour_steps():
    x = images(c=1)
    y = ContrastiveViews(**dict(NOTHING, jitter_p=1.0, gray_p=1.0))(x, torch.Generator().manual_seed(0))
    assert torch.allclose(y, x, atol=1e-5)
