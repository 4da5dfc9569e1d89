"""A small line chart drawn with torch tensor ops (no plotting library): MeCa's per-iteration
clean ACC and ASR of the enhanced model, written as PNG with ``torchvision.io.write_png``.

Layout: y axis 0-100 % with grid lines every 25 %, x axis the iteration (0 = after warm-up),
ACC in blue with square markers, ASR in red, a legend and tick labels in a 3x5 pixel font.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

# 3x5 glyphs, rows top to bottom, '#' = ink
_GLYPHS = {
    "0": ["###", "#.#", "#.#", "#.#", "###"], "1": [".#.", "##.", ".#.", ".#.", "###"],
    "2": ["###", "..#", "###", "#..", "###"], "3": ["###", "..#", "###", "..#", "###"],
    "4": ["#.#", "#.#", "###", "..#", "..#"], "5": ["###", "#..", "###", "..#", "###"],
    "6": ["###", "#..", "###", "#.#", "###"], "7": ["###", "..#", ".#.", ".#.", ".#."],
    "8": ["###", "#.#", "###", "#.#", "###"], "9": ["###", "#.#", "###", "..#", "###"],
    "A": [".#.", "#.#", "###", "#.#", "#.#"], "C": ["###", "#..", "#..", "#..", "###"],
    "S": ["###", "#..", "###", "..#", "###"], "R": ["##.", "#.#", "##.", "#.#", "#.#"],
    "E": ["###", "#..", "##.", "#..", "###"], "M": ["#.#", "###", "###", "#.#", "#.#"],
    "I": ["###", ".#.", ".#.", ".#.", "###"], "T": ["###", ".#.", ".#.", ".#.", ".#."],
    "K": ["#.#", "##.", "#..", "##.", "#.#"], "%": ["#.#", "..#", ".#.", "#..", "#.#"],
    "-": ["...", "...", "###", "...", "..."], " ": ["...", "...", "...", "...", "..."],
}

BLUE = (31, 119, 180)
RED = (214, 39, 40)
BLACK = (0, 0, 0)
GRID = (225, 225, 225)


class Canvas:
    def __init__(self, height: int, width: int):
        self.img = torch.full((3, height, width), 255, dtype=torch.uint8)
        self.h, self.w = height, width

    def rect(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        """Fill the pixel box [x0, x1] x [y0, y1] (inclusive, clipped)."""
        x0, x1 = max(min(x0, x1), 0), min(max(x0, x1), self.w - 1)
        y0, y1 = max(min(y0, y1), 0), min(max(y0, y1), self.h - 1)
        if x0 > x1 or y0 > y1:
            return
        self.img[:, y0:y1 + 1, x0:x1 + 1] = torch.tensor(color, dtype=torch.uint8)[:, None, None]

    def line(self, x0: float, y0: float, x1: float, y1: float, color, thickness: int = 2) -> None:
        n = int(max(abs(x1 - x0), abs(y1 - y0)) * 2) + 2
        t = torch.linspace(0, 1, n)
        xs = (x0 + t * (x1 - x0)).round().long()
        ys = (y0 + t * (y1 - y0)).round().long()
        c = torch.tensor(color, dtype=torch.uint8)[:, None]
        lo = -(thickness // 2)
        for dy in range(lo, lo + thickness):
            for dx in range(lo, lo + thickness):
                xx = (xs + dx).clamp(0, self.w - 1)
                yy = (ys + dy).clamp(0, self.h - 1)
                self.img[:, yy, xx] = c

    def text(self, x: int, y: int, s: str, color=BLACK, scale: int = 2) -> None:
        """Draw ``s`` with its top-left corner at (x, y); unknown characters are skipped."""
        for ch in s.upper():
            glyph = _GLYPHS.get(ch)
            if glyph is not None:
                for r, row in enumerate(glyph):
                    for col, v in enumerate(row):
                        if v == "#":
                            self.rect(x + col * scale, y + r * scale, x + col * scale + scale - 1,
                                      y + r * scale + scale - 1, color)
            x += 4 * scale


def text_width(s: str, scale: int = 2) -> int:
    return max(len(s) * 4 * scale - scale, 0)


def render_trend(acc: Sequence[Optional[float]], asr: Sequence[Optional[float]], *, height: int = 270,
                 width: int = 420) -> torch.Tensor:
    """``(3, H, W)`` uint8 chart of two series over x = 0..n-1 (values in [0,1]; None/nan skipped)."""
    c = Canvas(height, width)
    left, right, top, bottom = 48, width - 16, 34, height - 36
    n = max(len(acc), len(asr), 1)

    def px(i: float) -> float:
        return left + (right - left) * (i / (n - 1) if n > 1 else 0.5)

    def py(v: float) -> float:
        return bottom - (bottom - top) * min(max(v, 0.0), 1.0)

    for pct in (0, 25, 50, 75, 100):
        y = int(round(py(pct / 100)))
        c.rect(left, y, right, y, GRID)
        label = str(pct)
        c.text(left - 8 - text_width(label), y - 5, label)
    c.text(4, top - 26, "%")
    c.rect(left, top, left, bottom, BLACK)
    c.rect(left, bottom, right, bottom, BLACK)
    step = max(1, math.ceil(n / 12))
    for i in range(0, n, step):
        x = int(round(px(i)))
        c.rect(x, bottom, x, bottom + 4, BLACK)
        label = str(i)
        c.text(x - text_width(label) // 2, bottom + 8, label)
    c.text((left + right) // 2 - text_width("ITER") // 2, bottom + 22, "ITER", scale=1)
    c.text(left + 4, 6, "MECA", scale=2)
    for series, color, name, lx in ((acc, BLUE, "ACC", right - 150), (asr, RED, "ASR", right - 70)):
        c.rect(lx, 8, lx + 9, 17, color)
        c.text(lx + 14, 8, name)
        pts = [(px(i), py(float(v))) for i, v in enumerate(series)
               if v is not None and not (isinstance(v, float) and math.isnan(v))]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            c.line(x0, y0, x1, y1, color)
        for x, y in pts:
            c.rect(int(round(x)) - 2, int(round(y)) - 2, int(round(x)) + 2, int(round(y)) + 2, color)
    return c.img


def write_png_atomic(img: torch.Tensor, path: Path) -> None:
    from torchvision.io import write_png

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    write_png(img.contiguous(), str(tmp))
    os.replace(tmp, path)
