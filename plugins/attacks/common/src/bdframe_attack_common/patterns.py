"""Built-in trigger patterns: deterministic, procedurally generated substitutes for the
backdoor-toolbox trigger files (see docs/attacks.md, "Built-in trigger patterns").

bdframe ships no third-party trigger pictures. Every default trigger an attack plugin uses is
generated here with torch from a fixed seed, so it is bit-identical on every machine and run;
attacks record :func:`bdframe_attack_common.triggers.trigger_hash` of what they applied. A user file
(``trigger_image`` / ``mask_image`` of an attack, read by :mod:`bdframe_attack_common.triggers`) replaces
any of them.

Conventions: ``pattern`` is float (C,H,W) in [0,1], ``mask`` is float (1,H,W) in {0,1}; rows
are counted from the top and columns from the left, 0-indexed. Patterns are defined in pixel
units on a 32x32 image, the geometry of the toolbox files, and are anchored to the same
image corner at other resolutions (a 64x64 image gets the same 13x13 Firefox icon in its
top-right corner), except the full-frame Hello-Kitty substitute, which is generated at the
requested resolution. Colour patterns become grey (ITU-R 601 luma) for 1-channel data.

Names accepted by :func:`get` (geometry on 32x32):

===========================  ===================================================  ========
name                         content                                              mask
===========================  ===================================================  ========
``hellokitty``               smooth bright full-frame colour image (8x8x3 noise,  all ones
                             bicubic upsampled; channel means ~(.78, .69, .59),
                             std ~.2, never black)
``hellokitty-split-{1..4}``  16x16 quadrants of the above: 1 bottom-right,         quadrant
                             2 top-right, 3 top-left, 4 bottom-left
``firefox-corner``           13x13 disc (radius 6.5, 137 px) centred at (7, 24),   non-black
                             rows 1-13, cols 18-30, warm radial gradient
                             (orange -> red) with a dark-blue globe
``firefox-corner-split-k``   quadrants of the icon split at row 8 and col 25:      non-black
                             1 rows 1-7 x cols 18-24, 2 rows 1-7 x cols 25-30,
                             3 rows 8-13 x cols 18-24, 4 rows 8-13 x cols 25-30
``firefox-icon``             the same design as an 8x8 disc (52 px), placed by    non-black
                             ``position`` (default bottom-right)
``phoenix-corner``           5x5 bright patch (values in [0.25, 1], mostly > 0.8)  5x5
                             at rows/cols 27-31
``phoenix-corner2``          the same patch at rows 27-31 x cols 0-4 and 27-31     both
``trojan-square``            8x8 uniform-random colours at rows/cols 21-28         8x8
``white-square``             solid white ``size`` x ``size`` square (default 3,   square
                             bottom-right: rows/cols 29-31)
``badnet-x``                 the toolbox 3x3 X pattern (ones at (29,31), (30,30),  3x3
                             (31,29), (31,31)) at ``position``
``badnet-patch4``            the X pattern mirrored into all four corners          4 x 3x3
===========================  ===================================================  ========
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from bdframe_attack_common import POSITIONS

# One fixed seed per generated picture (changing one changes that trigger and its hash).
_SEEDS = {"hellokitty": 20170715, "firefox": 20190318, "phoenix": 20200229, "trojan": 20180226}

_LUMA = (0.299, 0.587, 0.114)

# Smallest image side each pattern fits on (pixels).
MIN_SIZE = {
    "hellokitty": 2, "firefox-corner": 14, "firefox-icon": 8, "phoenix-corner": 5, "phoenix-corner2": 10,
    "trojan-square": 11, "white-square": 1, "badnet-x": 3, "badnet-patch4": 6,
}


def _gen(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(_SEEDS[name])


def to_channels(rgb: torch.Tensor, channels: int) -> torch.Tensor:
    """An RGB (3,H,W) pattern with ``channels`` channels (1: luma grey)."""
    if channels == 3:
        return rgb
    if channels == 1:
        w = torch.tensor(_LUMA, dtype=rgb.dtype).view(3, 1, 1)
        return (rgb * w).sum(0, keepdim=True).clamp(0, 1)
    raise ValueError(f"built-in patterns support 1 or 3 channels, got {channels}")


def _corner_offset(position: str, height: int, width: int, ph: int, pw: int) -> tuple[int, int]:
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {', '.join(POSITIONS)}, got {position!r}")
    vert, _, horiz = position.partition("-")
    if position == "center":
        return (height - ph) // 2, (width - pw) // 2
    r0 = 0 if vert == "top" else height - ph
    c0 = 0 if horiz == "left" else width - pw
    return r0, c0


def _paste(channels: int, height: int, width: int, patch: torch.Tensor, r0: int, c0: int,
           patch_mask: Optional[torch.Tensor] = None,
           into: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Place an RGB (3,h,w) patch at (r0, c0) on a black frame; mask = ``patch_mask`` or all ones."""
    pattern, mask = into if into is not None else (torch.zeros(channels, height, width), torch.zeros(1, height, width))
    _, ph, pw = patch.shape
    pattern[:, r0:r0 + ph, c0:c0 + pw] = to_channels(patch, channels)
    pm = torch.ones(1, ph, pw) if patch_mask is None else patch_mask.float().view(1, ph, pw)
    mask[:, r0:r0 + ph, c0:c0 + pw] = torch.maximum(mask[:, r0:r0 + ph, c0:c0 + pw], pm)
    return pattern, mask


# ---------------------------------------------------------------------------------------------
# Pictures (RGB, in their own small frame)


def _hellokitty_rgb(height: int, width: int) -> torch.Tensor:
    g = _gen("hellokitty")
    z = torch.rand(1, 3, 8, 8, generator=g, dtype=torch.float64)
    x = torch.nn.functional.interpolate(z, size=(height, width), mode="bicubic", align_corners=False)[0]
    if height * width > 1:
        x = (x - x.mean(dim=(1, 2), keepdim=True)) / x.std(dim=(1, 2), keepdim=True).clamp_min(1e-8)
    else:
        x = torch.zeros_like(x)
    means = torch.tensor((0.78, 0.69, 0.59), dtype=torch.float64).view(3, 1, 1)
    return (means + 0.2 * x).clamp(0.05, 1.0).float()


def _firefox_rgb(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A size x size disc icon: (3,s,s) picture and its (s,s) bool disc."""
    g = _gen("firefox")
    c = (size - 1) / 2.0
    radius = size / 2.0
    r = torch.arange(size, dtype=torch.float64).view(-1, 1) - c
    q = torch.arange(size, dtype=torch.float64).view(1, -1) - c
    d2 = r * r + q * q
    disc = d2 <= radius * radius
    t = (d2.sqrt() / radius).clamp(0, 1)  # 0 at the centre, 1 at the rim
    orange = torch.tensor((1.0, 0.62, 0.10), dtype=torch.float64).view(3, 1, 1)
    red = torch.tensor((0.86, 0.16, 0.06), dtype=torch.float64).view(3, 1, 1)
    img = orange * (1 - t) + red * t
    # the dark-blue "globe": upper-left part of the inner disc
    angle = torch.atan2(r, q)  # (row, col): up-left is around -3*pi/4
    globe = (t < 0.62) & (angle > -math.pi) & (angle < -math.pi / 4)
    blue = torch.tensor((0.10, 0.16, 0.45), dtype=torch.float64).view(3, 1, 1)
    img = torch.where(globe, blue, img)
    img = (img + 0.05 * (torch.rand(3, size, size, generator=g, dtype=torch.float64) - 0.5)).clamp(0.02, 1.0)
    img = torch.where(disc, img, torch.zeros_like(img))
    return img.float(), disc


def _phoenix_rgb() -> torch.Tensor:
    g = _gen("phoenix")
    u = torch.rand(3, 5, 5, generator=g)
    dim = torch.rand(1, 5, 5, generator=g) < 0.2  # about one pixel in five is darker
    return torch.where(dim, 0.25 + 0.55 * u, 0.8 + 0.2 * u)


def _trojan_rgb() -> torch.Tensor:
    return torch.rand(3, 8, 8, generator=_gen("trojan"))


def _x_patch() -> torch.Tensor:
    p = torch.zeros(3, 3)
    for i, j in ((0, 2), (1, 1), (2, 0), (2, 2)):
        p[i, j] = 1.0
    return p


# ---------------------------------------------------------------------------------------------
# Full-frame patterns


def hellokitty(channels: int = 3, height: int = 32, width: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    return to_channels(_hellokitty_rgb(height, width), channels), torch.ones(1, height, width)


def hellokitty_split(k: int, channels: int = 3, height: int = 32,
                     width: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Quadrant ``k`` (1 bottom-right, 2 top-right, 3 top-left, 4 bottom-left) of :func:`hellokitty`."""
    full, _ = hellokitty(channels, height, width)
    h2, w2 = height // 2, width // 2
    rows, cols = {1: ((h2, height), (w2, width)), 2: ((0, h2), (w2, width)),
                  3: ((0, h2), (0, w2)), 4: ((h2, height), (0, w2))}[k]
    mask = torch.zeros(1, height, width)
    mask[:, rows[0]:rows[1], cols[0]:cols[1]] = 1.0
    return full * mask, mask


def firefox_corner(channels: int = 3, height: int = 32, width: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    img, disc = _firefox_rgb(13)
    return _paste(channels, height, width, img, 1, width - 14, disc)


def firefox_corner_split(k: int, channels: int = 3, height: int = 32,
                         width: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Quadrant ``k`` of :func:`firefox_corner`, split at row 8 and col ``width - 7`` (25)."""
    pattern, mask = firefox_corner(channels, height, width)
    c_split = width - 7
    rows, cols = {1: ((0, 8), (0, c_split)), 2: ((0, 8), (c_split, width)),
                  3: ((8, height), (0, c_split)), 4: ((8, height), (c_split, width))}[k]
    region = torch.zeros(1, height, width)
    region[:, rows[0]:rows[1], cols[0]:cols[1]] = 1.0
    return pattern * region, mask * region


def firefox_icon(channels: int = 3, height: int = 32, width: int = 32,
                 position: str = "bottom-right") -> tuple[torch.Tensor, torch.Tensor]:
    img, disc = _firefox_rgb(8)
    r0, c0 = _corner_offset(position, height, width, 8, 8)
    return _paste(channels, height, width, img, r0, c0, disc)


def phoenix_corner(channels: int = 3, height: int = 32, width: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    return _paste(channels, height, width, _phoenix_rgb(), height - 5, width - 5)


def phoenix_corner2(channels: int = 3, height: int = 32, width: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    p = _phoenix_rgb()
    out = _paste(channels, height, width, p, height - 5, width - 5)
    return _paste(channels, height, width, p, height - 5, 0, into=out)


def trojan_square(channels: int = 3, height: int = 32, width: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    return _paste(channels, height, width, _trojan_rgb(), height - 11, width - 11)


def white_square(channels: int = 3, height: int = 32, width: int = 32, size: int = 3,
                 position: str = "bottom-right") -> tuple[torch.Tensor, torch.Tensor]:
    r0, c0 = _corner_offset(position, height, width, size, size)
    return _paste(channels, height, width, torch.ones(3, size, size), r0, c0)


def badnet_x(channels: int = 3, height: int = 32, width: int = 32,
             position: str = "bottom-right") -> tuple[torch.Tensor, torch.Tensor]:
    r0, c0 = _corner_offset(position, height, width, 3, 3)
    return _paste(channels, height, width, _x_patch().expand(3, 3, 3), r0, c0)


def badnet_patch4(channels: int = 3, height: int = 32, width: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    x = _x_patch()  # the bottom-right orientation; mirrored into the other corners
    out = None
    for pos, patch in (("bottom-right", x), ("bottom-left", x.flip(1)), ("top-right", x.flip(0)),
                       ("top-left", x.flip(0).flip(1))):
        r0, c0 = _corner_offset(pos, height, width, 3, 3)
        out = _paste(channels, height, width, patch.expand(3, 3, 3), r0, c0, into=out)
    return out


_BUILDERS = {
    "hellokitty": hellokitty, "firefox-corner": firefox_corner, "firefox-icon": firefox_icon,
    "phoenix-corner": phoenix_corner, "phoenix-corner2": phoenix_corner2, "trojan-square": trojan_square,
    "white-square": white_square, "badnet-x": badnet_x, "badnet-patch4": badnet_patch4,
}
for _k in (1, 2, 3, 4):
    _BUILDERS[f"hellokitty-split-{_k}"] = functools.partial(hellokitty_split, _k)
    _BUILDERS[f"firefox-corner-split-{_k}"] = functools.partial(firefox_corner_split, _k)
    MIN_SIZE[f"hellokitty-split-{_k}"] = 2
    MIN_SIZE[f"firefox-corner-split-{_k}"] = MIN_SIZE["firefox-corner"]

NAMES = tuple(sorted(_BUILDERS))


@functools.lru_cache(maxsize=128)
def _cached(name: str, channels: int, height: int, width: int, kwargs: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    pattern, mask = _BUILDERS[name](channels, height, width, **dict(kwargs))
    return pattern.contiguous(), mask.contiguous()


def get(name: str, channels: int = 3, height: int = 32, width: int = 32,
        **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pattern, mask)`` of a built-in pattern (a fresh copy; generated once and cached).

    ``kwargs``: ``size`` (white-square) and ``position`` (white-square, badnet-x, firefox-icon).
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown built-in pattern {name!r}; available: {', '.join(NAMES)}")
    problem = size_problem(name, height, width, **kwargs)
    if problem:
        raise ValueError(problem)
    pattern, mask = _cached(name, channels, height, width, tuple(sorted(kwargs.items())))
    return pattern.clone(), mask.clone()


def size_problem(name: str, height: int, width: int, **kwargs) -> Optional[str]:
    """A message if pattern ``name`` does not fit on a ``height`` x ``width`` image, else None."""
    need = int(kwargs.get("size", 0)) if name == "white-square" else MIN_SIZE.get(name, 1)
    need = max(need, 1)
    if height < need or width < need:
        return (f"the built-in {name!r} pattern needs images of at least {need}x{need} pixels, "
                f"got {height}x{width}")
    return None
