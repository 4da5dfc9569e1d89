"""Trigger helpers shared by attack plugins: user trigger images, masks, mask blending, and the
dataset checks trigger attacks share.

Conventions (docs/attacks.md, "Conventions"): triggers are float (C,H,W) in [0,1] and masks are
(1,H,W) in [0,1]. An image file is read as RGB (an alpha channel is dropped, not composited)
and resized to the data resolution; without a mask file the mask is 1 wherever any channel
of the trigger is > 0, so pure-black trigger pixels are transparent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from bdframe.errors import UserError


def read_image(path: str, field: str, height: int, width: int, channels: int = 3) -> torch.Tensor:
    """A PNG/JPEG file as float (C,H,W) in [0,1], resized to (height, width)."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    p = Path(path).expanduser()
    problem = image_file_problem(str(path))
    if problem:
        raise UserError(f"{field}: {problem}")
    img = decode_image(read_file(str(p)), mode=ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY)
    x = img.float() / 255.0
    if tuple(x.shape[1:]) != (height, width):
        x = torch.nn.functional.interpolate(x[None], size=(height, width), mode="bilinear", antialias=True,
                                            align_corners=False)[0].clamp(0, 1)
    return x


def image_trigger(path: str, mask_path: Optional[str], field: str, height: int, width: int,
                  channels: int = 3, *, full_frame: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pattern, mask)`` from a trigger file and an optional mask file. Without a mask file
    the mask is the trigger's non-black pixels, or every pixel if ``full_frame`` (blends)."""
    pattern = read_image(path, field, height, width, channels)
    if mask_path:
        mask = read_image(mask_path, field.replace("trigger_image", "mask_image"), height, width, channels)[:1]
    elif full_frame:
        mask = torch.ones(1, height, width)
    else:
        mask = (pattern > 0).any(dim=0, keepdim=True).float()
    return pattern, mask


def mask_blend(x: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """``x + alpha * mask * (pattern - x)`` on float images (N,C,H,W) in [0,1]."""
    return x + (alpha * mask) * (pattern - x)


def apply_to_rows(images: torch.Tensor, rows: torch.Tensor, fn) -> torch.Tensor:
    """Return a copy of uint8 ``images`` with ``fn`` (float -> float, in [0,1]) applied to ``rows``,
    rounded back to uint8. Rows not selected are untouched bit for bit."""
    from bdframe.data import to_float, to_uint8

    out = images.clone()
    if len(rows):
        out[rows] = to_uint8(fn(to_float(images[rows])))
    return out


def trigger_hash(*tensors: torch.Tensor) -> str:
    import hashlib

    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def class_problems(config, num_classes: int, fields=("target",)) -> list[tuple[str, str]]:
    """``(field, message)`` for each class-index field of ``config`` outside ``[0, num_classes)``."""
    out = []
    for f in fields:
        v = getattr(config, f)
        if not 0 <= v < num_classes:
            out.append((f, f"must be a class index in [0, {num_classes - 1}], got {v}"))
    return out


def image_file_problem(path: str) -> Optional[str]:
    """Why ``path`` is not an image file bdframe can read (None if it is one).

    Decodes the file, so a text file named ``trigger.png`` is caught when a recipe is
    validated, not when the run reaches the attack; the message speaks of the file only.
    """
    from torchvision.io import decode_image, read_file

    p = Path(path).expanduser()
    if not p.exists():
        return f"file {path!r} does not exist"
    if not p.is_file():
        return f"{path!r} is not a file"
    try:
        decode_image(read_file(str(p)))
    except Exception:
        return f"file {path!r} is not a readable image (PNG, JPEG, GIF or WebP expected)"
    return None


def file_problems(config, fields=("trigger_image", "mask_image")) -> list[tuple[str, str]]:
    """``(field, message)`` for each given trigger/mask path that is not a readable image file."""
    out = []
    for f in fields:
        v = getattr(config, f)
        problem = image_file_problem(v) if v else None
        if problem:
            out.append((f, problem))
    return out


def channel_problems(info, field: str) -> list[tuple[str, str]]:
    """``(field, message)`` if the dataset's images are neither 1- nor 3-channel (triggers are
    generated or read for those two only)."""
    if info.channels in (1, 3):
        return []
    return [(field, f"triggers support 1- or 3-channel images, the dataset has {info.channels}")]


def patch_trigger_problems(config, info) -> list[tuple[str, str]]:
    """Checks shared by patch attacks with a ``pattern`` (generated) or a ``trigger_image`` (file):
    supported channel count, pattern size against the image, and trigger/mask files."""
    from bdframe_attack_common import patterns

    out = channel_problems(info, "pattern")
    if not config.trigger_image:
        square = config.pattern == "white-square"
        kw = {"size": config.patch_size} if square else {}
        problem = patterns.size_problem(config.pattern, info.height, info.width, **kw)
        if problem:
            out.append(("patch_size" if square else "pattern", problem))
    return out + file_problems(config)
