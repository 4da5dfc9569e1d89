"""Batched strong augmentation for self-supervised and semi-supervised stages.

:class:`ContrastiveViews` draws the SimCLR-style view of every image in a batch at once, with
parameters drawn per image from a ``torch.Generator`` (so a stage's views follow its seed):

1. random resized crop (area share in ``scale``, aspect ratio in ``ratio``, log-uniform) and a
   horizontal flip with probability 1/2, resampled in one ``grid_sample`` (bicubic or bilinear);
2. colour jitter with probability ``jitter_p``: brightness, contrast and saturation factors in
   ``[1 - s, 1 + s]`` and a hue shift in ``[-hue, hue]`` turns, applied in an order drawn once
   per batch;
3. grayscale with probability ``gray_p``;
4. Gaussian blur with probability ``blur_p``, its sigma uniform in ``blur_sigma``.

Images are float tensors ``(B, C, H, W)`` in [0, 1] (RGB for the colour steps; a
single-channel batch skips them), on any device; the output has the input's shape, in [0, 1].
Where torchvision's per-image transforms retry a crop that does not fit, this one clamps its
width and height to the image, and its jitter order is shared by the batch.
"""

from __future__ import annotations

import math

import attrs
import torch
import torch.nn.functional as F

from bdframe.config import in_range, one_of

_GRAY = (0.2989, 0.587, 0.114)  # the weights torchvision and PIL use


def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float32)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of RGB images, ``(B, 1, H, W)``."""
    w = x.new_tensor(_GRAY)[None, :, None, None]
    return (x * w).sum(1, keepdim=True)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] to HSV with hue in [0, 1) turns, per pixel."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    v = maxc
    s = torch.where(maxc > 0, delta / maxc.clamp(min=1e-12), torch.zeros_like(maxc))
    d = delta.clamp(min=1e-12)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, v], 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`rgb_to_hsv`."""
    h, s, v = x.unbind(1)
    h6 = (h % 1.0) * 6.0
    k = torch.stack([(5.0 + h6) % 6.0, (3.0 + h6) % 6.0, (1.0 + h6) % 6.0], 1)
    w = (torch.minimum(k, 4.0 - k)).clamp(0.0, 1.0)
    return v[:, None] - (v * s)[:, None] * w


def _gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    r = (size - 1) / 2
    t = torch.arange(size, dtype=torch.float32, device=sigma.device) - r
    k = torch.exp(-0.5 * (t[None, :] / sigma[:, None]) ** 2)
    return k / k.sum(1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Blur each image with its own separable Gaussian (``sigma`` per image, kernel ``size``,
    reflected borders)."""
    b, c, h, w = x.shape
    k = _gaussian_kernels(sigma.to(x.device, torch.float32), size).to(x.dtype)  # (B, size)
    k = k.repeat_interleave(c, 0)  # a kernel per (image, channel)
    pad = size // 2
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), k[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


@attrs.frozen
class ContrastiveViews:
    """One random view of every image of a batch; see the module text. Call it twice for the
    two views of contrastive learning."""

    scale: tuple[float, float] = attrs.field(default=(0.2, 1.0))
    ratio: tuple[float, float] = attrs.field(default=(3 / 4, 4 / 3))
    flip: bool = True
    interpolation: str = attrs.field(default="bicubic", validator=one_of("bicubic", "bilinear"))
    jitter_p: float = attrs.field(default=0.8, validator=in_range(0, 1))
    brightness: float = attrs.field(default=0.4, validator=in_range(0, 1))
    contrast: float = attrs.field(default=0.4, validator=in_range(0, 1))
    saturation: float = attrs.field(default=0.4, validator=in_range(0, 1))
    hue: float = attrs.field(default=0.1, validator=in_range(0, 0.5))
    gray_p: float = attrs.field(default=0.2, validator=in_range(0, 1))
    blur_p: float = attrs.field(default=0.5, validator=in_range(0, 1))
    blur_sigma: tuple[float, float] = attrs.field(default=(0.1, 2.0))
    blur_size: int = 3

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        b, c, h, w = x.shape
        dev = x.device
        x = self._crop_flip(x, g)
        if c == 3:
            x = self._jitter(x, g)
            gray = torch.rand(b, generator=g) < self.gray_p
            if bool(gray.any()):
                x = torch.where(gray.to(dev)[:, None, None, None], grayscale(x).expand_as(x), x)
        blur = torch.rand(b, generator=g) < self.blur_p
        sigma = _uniform(g, b, *self.blur_sigma)
        if bool(blur.any()) and self.blur_size > 1:
            x = torch.where(blur.to(dev)[:, None, None, None], gaussian_blur(x, sigma, self.blur_size), x)
        return x.clamp(0.0, 1.0)

    def _crop_flip(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Random resized crop and flip as one affine resampling (normalised coordinates)."""
        b = x.shape[0]
        area = _uniform(g, b, *self.scale)
        logr = _uniform(g, b, math.log(self.ratio[0]), math.log(self.ratio[1]))
        ar = torch.exp(logr)
        cw = torch.sqrt(area * ar).clamp(max=1.0)  # crop width and height as shares of the image
        ch = torch.sqrt(area / ar).clamp(max=1.0)
        cx = (torch.rand(b, generator=g) * 2 - 1) * (1 - cw)  # centre, in [-1, 1] units
        cy = (torch.rand(b, generator=g) * 2 - 1) * (1 - ch)
        sx = cw * torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0) if self.flip else cw
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, ch, cy
        grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode=self.interpolation, padding_mode="border", align_corners=False)

    def _jitter(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        b = x.shape[0]
        dev = x.device
        on = (torch.rand(b, generator=g) < self.jitter_p).to(dev)
        f = {"brightness": _uniform(g, b, 1 - self.brightness, 1 + self.brightness),
             "contrast": _uniform(g, b, 1 - self.contrast, 1 + self.contrast),
             "saturation": _uniform(g, b, 1 - self.saturation, 1 + self.saturation),
             "hue": _uniform(g, b, -self.hue, self.hue)}
        order = torch.randperm(4, generator=g).tolist()
        if not bool(on.any()):
            return x
        y = x
        for i in order:
            name = ("brightness", "contrast", "saturation", "hue")[i]
            v = f[name].to(dev, x.dtype)[:, None, None, None]
            if name == "brightness":
                y = (y * v).clamp(0, 1)
            elif name == "contrast":
                m = grayscale(y).mean((2, 3), keepdim=True)
                y = ((y - m) * v + m).clamp(0, 1)
            elif name == "saturation":
                gr = grayscale(y)
                y = ((y - gr) * v + gr).clamp(0, 1)
            elif self.hue > 0:
                hsv = rgb_to_hsv(y)
                hsv = torch.cat([(hsv[:, :1] + v) % 1.0, hsv[:, 1:]], 1)
                y = hsv_to_rgb(hsv).clamp(0, 1)
        return torch.where(on[:, None, None, None], y, x)
